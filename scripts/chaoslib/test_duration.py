"""Unit tests of chaoslib.duration: `python3 -m unittest discover -s scripts/chaoslib -t scripts`."""
import argparse
import unittest

from chaoslib.duration import seconds


class Seconds(unittest.TestCase):
    def test_the_launchers_forms(self):
        for text, want in [("60s", 60.0), ("2m", 120.0), ("500ms", 0.5), ("1.5s", 1.5), ("1h", 3600.0),
                           ("600", 600.0), ("32.5", 32.5), (" 10s ", 10.0), (".5s", 0.5), ("0", 0.0)]:
            self.assertEqual(seconds(text), want, text)

    def test_malformed_is_a_usage_error(self):
        for text in ["", "s", "-1s", "5 parsecs", "1.2.3s", "2min", "1e3", "abc", "10 s"]:
            with self.assertRaises(argparse.ArgumentTypeError, msg=text):
                seconds(text)


if __name__ == "__main__":
    unittest.main()
