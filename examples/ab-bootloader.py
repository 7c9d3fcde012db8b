#!/usr/bin/env python3
"""A bootloader stand-in for `fwagent run --flash ab:DIR` (docs/AB-SLOTS.md).

One call is one power-on: it reads DIR/bootctl.json, picks the slot to boot
the way U-Boot's boot-count logic (or RAUC's bootchooser) would, writes the
record back atomically and prints the slot that came up:

    if next != null and tries > 0:  tries -= 1; booted = next   # a trial boot
    else:                           next = null; tries = 0; booted = active

With a real bootloader a small script maps these keys onto its environment
(fw_setenv BOOT_ORDER / BOOT_x_LEFT, grub-editenv, ...). `make demo FLASH=ab`
uses this one; tests/install.rs has the same algorithm in Rust.
"""
import json
import os
import sys


def power_on(d: str) -> str:
    path = os.path.join(d, "bootctl.json")
    with open(path) as f:
        r = json.load(f)
    if r.get("next") and r.get("tries", 0) > 0:
        r["tries"] -= 1
        r["booted"] = r["next"]
    else:
        r["next"], r["tries"] = None, 0
        r["booted"] = r["active"]
    tmp = path + ".boot.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return r["booted"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ab-bootloader.py SLOTS_DIR")
    print(power_on(sys.argv[1]))
