#!/bin/sh
# A toy credentials decoder for requests/seed-2-ftp-enciphered.json.
#
# The vendor's second example carries a userName and password whose base64
# does not decode to text: they look enciphered, and the cipher is not public.
# This script is a STAND-IN for the vendor's decoder, so the example can be
# checked and demonstrated: it ignores what it is given and prints fixed text,
# one value per field. A real decoder would decipher its input.
#
# Contract (docs/PROTOCOL-NOTES.md): run as `sh -c CMD`; stdin holds the base64
# text of one credential and a newline; FWAGENT_CREDENTIAL_FIELD says which one
# (userName or password); stdout is the plain credential (one trailing newline
# is dropped); exit 0 on success; it is killed after 5 s; stderr is discarded.
#
#   fwagent check --credentials-decoder examples/decode-credentials.sh \
#       examples/requests/seed-2-ftp-enciphered.json

cat >/dev/null
case "$FWAGENT_CREDENTIAL_FIELD" in
    userName) printf '%s\n' demo-user ;;
    password) printf '%s\n' demo-password ;;
    *) echo "decode-credentials.sh: unknown field" >&2; exit 1 ;;
esac
