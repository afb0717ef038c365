"""Masking cost per log record: registered literals only vs. all their encoded forms.

Issue 8, finding 4 made the masker redact the JSON-escaped, URL-encoded, base64 and reversed
forms of every registered secret, not only its exact text. This measures what that costs the
log sink, per record, in one process and one run (baseline and candidate interleaved, medians
of ``--repeat`` rounds):

* ``literal``: a `Masker` whose forms are what it redacted before (the value and its
  ``quote(value, safe="")``) — the baseline;
* ``forms``: the production `Masker` (`secret_patterns.literal_forms`).

Each round registers ``--secrets`` random secrets (as a worker step does) and masks
``--records`` distinct structlog-shaped event dicts (``mask_processor`` input: event name,
ids, a URL, a short message, a nested dict) — clean ones, and with ``--dirty`` a share that
embeds a secret or one of its forms. Records are distinct so the masker's text cache (which
serves repeated short strings) does not hide the regex cost. The JSON line printed at the end
has the medians in microseconds per record and the ratio.

    .venv/bin/python bench/masking.py
    .venv/bin/python bench/masking.py --secrets 1 4 16 --records 20000 --repeat 7
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from opsconductor.common.masking import Masker


def literal_only(value: str) -> Iterable[str]:
    """What the masker redacted before finding 4: the value and its URL-encoded form."""
    return (value, quote(value, safe=""))


def records(count: int, secret_values: list[str], dirty: float, seed: str) -> list[dict[str, Any]]:
    """``count`` distinct event dicts; a ``dirty`` share carries a secret in some form."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        execution = f"{seed}-{i:08d}-7c1e-4b7a-9d2e-5f3a1b2c{i % 10000:04d}"
        record: dict[str, Any] = {
            "event": "step_finished",
            "execution_id": execution,
            "step_id": f"s{i % 7}",
            "tenant_id": "acme-prod",
            "status": "succeeded",
            "elapsed_ms": i % 997,
            "url": f"https://api.example.com/v2/services/{i}/status?verbose=true",
            "message": f"HTTP GET returned status 200 after {i % 997} ms for target db-{i}",
            "result": {"status": 200, "body": f'{{"ok": true, "item": {i}, "note": "fine"}}'},
        }
        if secret_values and (i * 7919) % 1000 < dirty * 1000:
            value = secret_values[i % len(secret_values)]
            form = i % 3
            if form == 0:
                record["result"]["body"] = f'{{"echo": {json.dumps(value)}}}'
            elif form == 1:
                record["message"] = "auth " + base64.b64encode(f"x{value}".encode()).decode()
            else:
                record["url"] += "&t=" + quote(value, safe="")
        out.append(record)
    return out


def per_record_us(masker: Masker, batch: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for record in batch:
        masker.process_event(None, "info", dict(record))
    return (time.perf_counter() - started) / len(batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secrets", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dirty", type=float, default=0.01, help="share of records with one")
    args = parser.parse_args()
    results = []
    for count in args.secrets:
        values = [f"S3cr{secrets.token_urlsafe(18)}" for _ in range(count)]
        timings: dict[str, list[float]] = {"literal": [], "forms": []}
        compile_s: dict[str, float] = {}
        warm = Masker()
        warm.register_secrets(values)
        per_record_us(warm, records(min(args.records, 2000), values, args.dirty, "warm"))
        for round_ in range(args.repeat):
            batch = records(args.records, values, args.dirty, f"r{round_}")
            for name, forms in (("literal", literal_only), ("forms", None)):
                masker = Masker() if forms is None else Masker(forms=forms)
                started = time.perf_counter()
                masker.register_secrets(values)
                compile_s[name] = time.perf_counter() - started
                timings[name].append(per_record_us(masker, batch))
        literal = statistics.median(timings["literal"])
        forms_us = statistics.median(timings["forms"])
        row = {
            "secrets": count,
            "records": args.records,
            "dirty": args.dirty,
            "literal_us_per_record": round(literal, 2),
            "forms_us_per_record": round(forms_us, 2),
            "ratio": round(forms_us / literal, 3),
            "register_ms_literal": round(compile_s["literal"] * 1000, 2),
            "register_ms_forms": round(compile_s["forms"] * 1000, 2),
        }
        results.append(row)
        print(
            f"{count:>3} secrets: literal {literal:7.2f} us/record, all forms "
            f"{forms_us:7.2f} us/record (x{forms_us / literal:.2f}); registering: "
            f"{row['register_ms_literal']} ms vs {row['register_ms_forms']} ms"
        )
    print(json.dumps({"benchmark": "masking", "repeat": args.repeat, "results": results}))


if __name__ == "__main__":
    main()
