"""The parts of the SDK that run natively: `python3 -m unittest` in guest-sdk-py/."""

import unittest

import grex_sdk


class FoldTest(unittest.TestCase):
    def test_inputs_with_and_without_an_accumulator_decode(self):
        # The same bytes as grex_client::proto::encode_fold writes (its unit test).
        self.assertEqual(grex_sdk.fold(bytes([0, 1, 0, 0, 0, ord("3"), 0, 0, 0, 0])), (None, [b"3", b""]))
        self.assertEqual(grex_sdk.fold(bytes([1, 2, 0, 0, 0, ord("4"), ord("2"), 1, 0, 0, 0, ord("7")])), (b"42", [b"7"]))
        for bad in [b"", b"\x01", b"\x00\x09\x00\x00\x00\x01", b"\x02"]:
            with self.assertRaises(ValueError):
                grex_sdk.fold(bad)


class OutputTest(unittest.TestCase):
    def test_results_become_bytes(self):
        self.assertEqual(grex_sdk._output(b"\x00\xff"), b"\x00\xff")
        self.assertEqual(grex_sdk._output("héllo"), "héllo".encode())
        self.assertEqual(grex_sdk._output(None), b"")
        self.assertEqual(grex_sdk._output({"balance": 5, "count": 1}), b'{"balance":5,"count":1}')

    def test_the_bucket_outside_a_component_says_so(self):
        with self.assertRaisesRegex(RuntimeError, "only inside a job's component"):
            grex_sdk.get_text("count")


if __name__ == "__main__":
    unittest.main()
