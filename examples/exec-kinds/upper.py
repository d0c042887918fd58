#!/usr/bin/env python3
"""acme.upper, oneshot: the payload {"text"} on stdin, {"upper"} on stdout."""
import json
import sys

payload = json.load(sys.stdin)
if not isinstance(payload.get("text"), str):
    print("text must be a string", file=sys.stderr)
    sys.exit(1)
json.dump({"upper": payload["text"].upper()}, sys.stdout)
