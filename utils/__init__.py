"""Library code shared by the entry scripts: data, triggers, training, attacks, defenses, I/O."""
