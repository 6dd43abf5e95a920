#!/usr/bin/env python3
"""Container health probe: ``llmq-healthcheck [URL]`` exits 0 when URL answers 2xx.

The slim image has no curl or wget; compose's healthchecks run this instead.
Standard library only, so it runs with the image's system Python.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT = "http://127.0.0.1:9464/readyz"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT
    if urlsplit(url).scheme not in ("http", "https"):
        print(f"llmq-healthcheck: not an http(s) URL: {url}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - scheme checked
            return 0 if 200 <= response.status < 300 else 1
    except urllib.error.HTTPError as exc:
        print(f"llmq-healthcheck: {url}: HTTP {exc.code}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"llmq-healthcheck: {url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
