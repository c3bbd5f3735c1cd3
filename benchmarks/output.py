"""What every benchmark does with its result: print the table, and write the JSON where ``--json`` says."""
from __future__ import annotations

import json


def emit(result: dict, text: str, json_path: str | None) -> dict:
    print(text, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def bench_main(parse, run, table, argv=None) -> dict:
    """A benchmark's ``main``: parse the arguments, run, print the table, write the JSON if asked."""
    a = parse(argv)
    res = run(a)
    return emit(res, table(res), a.json)
