#!/usr/bin/env python3
"""acme.upper-stream: the same in stream mode, one JSON line per job each way."""
import json
import sys

for line in sys.stdin:
    job = json.loads(line)
    text = job["payload"].get("text")
    if isinstance(text, str):
        answer = {"id": job["id"], "result": {"upper": text.upper()}}
    else:
        answer = {"id": job["id"], "error": "text must be a string", "retryable": False}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
