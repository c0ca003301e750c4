"""Runs several `lmcache` CLI invocations in one interpreter (each import of the CLI pulls torch,
several seconds) and prints one JSON object per invocation: argv, exit code, stdout, stderr.

Run with the lmcache==0.5.6 virtualenv's python: python lmcache_cli_driver.py '<json list of argv lists>'.
"""

import contextlib
import io
import json
import sys

from lmcache.cli.main import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:]})
print(json.dumps(results))
