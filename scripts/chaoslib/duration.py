"""`--duration`'s forms, the launcher's: `500ms`, `60s`, `1.5s`, `2m`, `1h`; a bare number is
seconds (cli::parse_duration in src/cli/, which the harness follows)."""
import argparse
import re

_UNITS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_FORM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?")


def seconds(text: str) -> float:
    """`text` in seconds; argparse.ArgumentTypeError (argparse's usage error) when malformed."""
    m = _FORM.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 500ms, 60s or 2m "
                                         "(a bare number is seconds)")
    return float(m.group(1)) * _UNITS[m.group(2) or ""]
