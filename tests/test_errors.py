"""API failures are classified once, by status, into a `Failure` that says whether to retry; the exception
tree in errors.py's docstring is the tree the module defines."""

from __future__ import annotations

import inspect
import re

import httpx
import pytest

from ingest import errors
from ingest.api import classify
from ingest.errors import Failure

CASES = [
    (200, None, None, None),
    (429, None, Failure.RATE_LIMITED, True),
    (500, None, Failure.SERVER, True),
    (503, "cursor", Failure.SERVER, True),
    (401, None, Failure.UNAUTHORIZED, False),
    (403, None, Failure.FORBIDDEN, False),
    (400, "cursor", Failure.CURSOR_REJECTED, False),
    (404, "cursor", Failure.CURSOR_REJECTED, False),
    (400, None, Failure.REJECTED, False),
    (422, "cursor", Failure.REJECTED, False),
]


@pytest.mark.parametrize(("status", "after", "failure", "retriable"), CASES)
def test_each_status_is_classified_once_as_retriable_or_fatal(status, after, failure, retriable):
    found = classify(httpx.Response(status), after)
    assert found is failure
    if found is not None:
        assert found.retriable is retriable


def test_the_docstring_tree_names_every_exception_with_its_exit_code():
    classes = {
        name: cls for name, cls in vars(errors).items() if inspect.isclass(cls) and issubclass(cls, errors.IngestError)
    }
    tree = {
        m[1]: m[2] for m in re.finditer(r"(\w+Error|Interrupted|CursorRejected|VerifyFailed)\s+(\d*)\s", errors.__doc__)
    }
    assert set(tree) == set(classes)
    for name, cls in classes.items():
        if tree[name]:
            assert int(tree[name]) == cls.exit_code, name


def test_an_api_error_knows_its_failure_kind_without_reading_its_message():
    assert errors.CursorRejected("x").failure is Failure.CURSOR_REJECTED
    assert errors.ApiUnavailableError("x", failure=Failure.SERVER).failure is Failure.SERVER
    assert errors.AuthError("x").exit_code == 3 and not errors.AuthError("x").failure.retriable
