"""Schemathesis hooks for tests/python/schemathesis.sh (loaded via SCHEMATHESIS_HOOKS).

Owns the one bound the fuzzing pass puts on generated requests: a token batch of up to
100,000 tokens is valid but costs seconds to tens of seconds each, so the fuzzer would spend
its whole budget minting tokens. Counts above 1,000 are folded into 1..1,000; the limits
themselves (0 and above 100,000) still reach the server and must be refused.

It also keeps a CPython 3.11 bug (gh-106905, fixed in 3.11.8) out of the run: Hypothesis
names each filter lambda by parsing the source file it comes from, and parsing schemathesis'
largest module can raise "SystemError: AST constructor recursion depth mismatch", which
schemathesis reports as a runtime error of whichever operation it was generating for. The
name is only a label for reprs, so a lambda that cannot be named gets a generic one.
"""

import schemathesis
from hypothesis.internal import lambda_sources

_describe_lambda = lambda_sources.lambda_description


def _lambda_description_or_generic(f):
    try:
        return _describe_lambda(f)
    except SystemError:
        return "lambda: <unknown>"


lambda_sources.lambda_description = _lambda_description_or_generic

BATCH_PATH = "/api/v1/tokens/batch"
MAX_FUZZED_COUNT = 1000


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path != BATCH_PATH or not isinstance(case.body, dict):
        return
    count = case.body.get("count")
    # bool is an int in Python; leave it alone, the server must refuse it.
    if type(count) is int and MAX_FUZZED_COUNT < count <= 100_000:
        case.body["count"] = count % MAX_FUZZED_COUNT + 1
