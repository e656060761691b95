"""Model specs as they may be shown: credentials never leave the command line."""

from __future__ import annotations

import pytest

from blackbox_vqa.specs import public_spec


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("http://user:s3cret@127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://tok@api.example.com/models/vqa?api_key=k#x", "https://api.example.com/models/vqa"),
        ("HTTP://a:b@[::1]:9000/p/", "http://[::1]:9000/p/"),
        ("http://u:p@[::1/x?k=v", "http://[::1/x"),  # too broken for urlsplit
        ("http://u:p@host@other:80/", "http://other:80/"),
        ("http://127.0.0.1:8000/v", "http://127.0.0.1:8000/v"),
        ("easyvqa", "easyvqa"),
        ("models/my@model.onnx", "models/my@model.onnx"),
        ("pkg.mod:factory", "pkg.mod:factory"),
    ],
)
def test_public_spec_drops_user_password_query_and_fragment(spec: str, shown: str) -> None:
    assert public_spec(spec) == shown
