#!/usr/bin/env bash
# Download the official GTSRB archives, verify their MD5 checksums and unpack them into the layout
# the loader reads (torchvision's): <data_root>/gtsrb/GTSRB/Training/<class>/*.ppm,
# <data_root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and <data_root>/gtsrb/GT-final_test.csv.
# Safe to re-run: verified archives are kept and not fetched again.
# Usage: bash gtsrb_download.sh [data_root]   (default ./data)
set -euo pipefail
ROOT="${1:-./data}"
DEST="$ROOT/gtsrb"
BASE="https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370"
FILES=(
  "GTSRB-Training_fixed.zip 513f3c79a4c5141765e10e952eaa2478"
  "GTSRB_Final_Test_Images.zip c7e4e6327067d32654124b0fe9e82185"
  "GTSRB_Final_Test_GT.zip fe31e9c9270bbcd7b84b7f21a9d9d9e5"
)
mkdir -p "$DEST"
for entry in "${FILES[@]}"; do
  read -r name md5 <<<"$entry"
  file="$DEST/$name"
  if [ -f "$file" ] && [ "$(md5sum "$file" | cut -d' ' -f1)" = "$md5" ]; then
    echo "ok: $name (already downloaded)"
  else
    echo "downloading $name"
    if ! curl -fL --retry 3 -o "$file.part" "$BASE/$name"; then
      rm -f "$file.part"
      echo "error: could not download $BASE/$name (offline?). Copy the three GTSRB zips into '$DEST' by hand and re-run." >&2
      exit 1
    fi
    got="$(md5sum "$file.part" | cut -d' ' -f1)"
    if [ "$got" != "$md5" ]; then
      rm -f "$file.part"
      echo "error: checksum mismatch for $name (got $got, want $md5); re-run to download again." >&2
      exit 1
    fi
    mv "$file.part" "$file"
  fi
  unzip -qo "$file" -d "$DEST"
done
echo "GTSRB ready under $DEST (train: $DEST/GTSRB/Training, test: $DEST/GTSRB/Final_Test/Images + $DEST/GT-final_test.csv)"
