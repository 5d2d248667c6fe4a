"""Every hypothesis strategy the tests share."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from sessionfsm import Exponential, Fixed, Lane, Policy, ReasonPolicy, acks

SESSION_IDS = tuple(f"s{i}" for i in range(6))

session_ids = st.sampled_from(SESSION_IDS)
lanes = st.sampled_from(list(Lane))

retry_after = st.none() | st.floats(min_value=0.0, max_value=60.0, allow_nan=False)

any_ack: st.SearchStrategy[acks.Ack] = st.one_of(
    st.just(acks.Ok()),
    st.just(acks.AckTimeout()),
    st.builds(acks.RateLimited, retry_after_s=retry_after),
    st.just(acks.RelayUnavailable()),
    st.just(acks.PayloadTooLarge()),
)

backoffs = st.one_of(
    st.builds(Fixed, delay_s=st.sampled_from([0.0, 3.0, 10.0, 30.0])),
    st.builds(
        Exponential,
        base_s=st.sampled_from([1.0, 2.0]),
        factor=st.sampled_from([1.0, 2.0]),
        cap_s=st.sampled_from([5.0, 20.0]),
        jitter=st.booleans(),
    ),
)


def reason_policies(retryable: bool | None = None) -> st.SearchStrategy[ReasonPolicy]:
    return st.builds(
        ReasonPolicy,
        threshold=st.integers(1, 4),
        backoff=backoffs,
        honour_retry_after=st.booleans(),
        retry_after_cap_s=st.sampled_from([5.0, 60.0]),
        retryable=st.booleans() if retryable is None else st.just(retryable),
    )


policies: st.SearchStrategy[Policy] = st.builds(
    Policy,
    batch_size=st.integers(1, 4),
    incremental_interval_s=st.sampled_from([0.0, 5.0, 30.0]),
    backfill_batch_size=st.integers(1, 3),
    backfill_interval_s=st.sampled_from([0.0, 10.0]),
    max_in_flight=st.integers(1, 3),
    ack_timeout_s=st.sampled_from([7.0, 30.0]),
    tick_interval_s=st.just(5.0),
    max_backoff_s=st.sampled_from([15.0, 3600.0]),
    ack_timeout=reason_policies(),
    rate_limited=reason_policies(),
    payload_too_large=reason_policies(),
    max_relay_refusal_s=st.sampled_from([0.0, 20.0, 21600.0]),
)

#: One step of a random driver: see ``tests/test_differential.py``.
operations: st.SearchStrategy[tuple[Any, ...]] = st.one_of(
    st.tuples(st.just("enqueue"), session_ids, lanes),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 5.0, 12.0, 40.0])),
    st.tuples(st.just("ack"), st.integers(0, 3), any_ack),
    st.tuples(
        st.just("ack_each"),
        st.integers(0, 3),
        st.dictionaries(session_ids, any_ack, max_size=4),
    ),
    st.tuples(st.just("redrive"), session_ids),
    st.tuples(st.just("relay_ready")),
    st.tuples(st.just("relay_unavailable")),
    st.tuples(st.just("clock_back"), st.sampled_from([1.0, 100.0])),
)

#: Times a record or a step may carry in the table tests.
times = st.sampled_from([0.0, 10.0, 100.0])

#: Everything besides (state, event) that one transition of the table sees.
pair_contexts: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "policy": policies,
        "counts": st.tuples(*[st.integers(0, 5)] * 3),
        "dirty": st.booleans(),
        "retry": times,
        "now": times,
        "retry_after_s": retry_after,
        # What the blame guards read: shared by several sessions; evidence
        # (the relay accepted another since this session's previous attempt).
        "shared": st.booleans(),
        "evidence": st.booleans(),
    }
)

# ------------------------------------------------------------- simulation


@st.composite
def flapping_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """A small scenario (as parsed TOML) whose relay only flaps, reported or
    not, and never refuses a payload: nobody may be charged for anything."""
    flaps = []
    at = 0.0
    for _ in range(draw(st.integers(0, 6))):
        at += draw(st.floats(0.0, 120.0, allow_nan=False))
        length = draw(st.floats(1.0, 400.0, allow_nan=False))
        flaps.append({"at_s": at, "for_s": length, "reported": draw(st.booleans())})
        at += length
    groups = [
        {
            "name": f"g{i}",
            "count": draw(st.integers(1, 15)),
            "lane": draw(lanes).value,
            "size_bytes": draw(st.integers(0, 1000)),
            "arrive_at_s": draw(st.floats(0.0, 300.0, allow_nan=False)),
            "arrive_over_s": draw(st.floats(0.0, 300.0, allow_nan=False)),
            "changes": draw(st.integers(0, 3)),
            "change_every_s": draw(st.floats(1.0, 60.0, allow_nan=False)),
        }
        for i in range(draw(st.integers(1, 3)))
    ]
    return {
        "seed": draw(st.integers(0, 2**16)),
        "max_time_s": 50_000.0,
        "relay": {
            "size_limit_bytes": 1000,
            "latency_s": draw(st.floats(0.0, 5.0, allow_nan=False)),
            "latency_jitter_s": draw(st.floats(0.0, 5.0, allow_nan=False)),
            "flaps": flaps,
        },
        "sessions": groups,
    }


#: Which store backs an engine in the persistence tests.
store_kinds = st.sampled_from(["memory", "sqlite"])

#: ``operations`` plus ``("restart",)`` about one time in four: the process
#: dies and a new engine recovers from its store.
operations_with_restarts: st.SearchStrategy[tuple[Any, ...]] = st.integers(0, 3).flatmap(
    lambda i: st.just(("restart",)) if i == 0 else operations
)


# --------------------------------------------------------- hostile inputs

#: Anything a caller or a wire might hand a decoder: bytes, text (lone
#: surrogates included), JSON-ish nesting, and arbitrary Python objects.
hostile_wire = st.one_of(
    st.binary(max_size=200),
    st.text(st.characters(codec=None), max_size=80),
    st.text(st.sampled_from('{}[]":,0123456789.eE-+ntrufalsyp\\'), max_size=120),
    st.integers(1, 3000).map(lambda n: '{"type":"Ok","x":' + "[" * n + "]" * n + "}"),
    st.integers(1, 3000).map(lambda n: b'{"batch_id":1,"ack":' + b"[" * n + b"]" * n + b"}"),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=10,
    ),
    st.builds(object),
    st.just(memoryview(b'{"type":"Ok"}')),
    st.just(bytearray(b'{"batch_id":1,"ack":{"type":"Ok"}}')),
)

#: Anything a caller might pass as an ack, a batch id or a message.
hostile_objects = st.one_of(
    hostile_wire,
    st.dictionaries(st.text(max_size=4) | st.integers(), hostile_wire, max_size=3),
    st.sampled_from([acks.Ok(), acks.RateLimited(retry_after_s=-1.0), acks.AckTimeout()]),
    st.floats(),
    st.lists(st.integers(), max_size=3),
)


#: One public call for the fault test, and the fault (if any) its save meets:
#: ("enqueue", sid, lane) ("tick", dt) ("ack", pick, ack) ("acks", pick, ack)
#: ("redrive", pick) ("redrive_all",) ("ready",) ("unavailable",).
faults = st.sampled_from([None, None, None, "locked", "full", "io"])
fault_calls = st.one_of(
    st.tuples(st.just("enqueue"), session_ids, lanes),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 5.0, 10.0, 25.0, 60.0])),
    st.tuples(st.just("ack"), st.integers(0, 3), any_ack),
    st.tuples(st.just("acks"), st.integers(0, 3), any_ack),
    st.tuples(st.just("redrive"), st.integers(0, 5)),
    st.tuples(st.just("redrive_all")),
    st.tuples(st.just("ready")),
    st.tuples(st.just("unavailable")),
)
fault_scripts = st.lists(st.tuples(fault_calls, faults), min_size=1, max_size=40)
# ------------------------------------------------- what a relay may send back

#: Batch sessions the reply strategies refer to (a batch of these three).
REPLY_SESSIONS = ("a", "b", "c")

_ack_json = st.sampled_from(
    [
        b'{"type":"Ok"}',
        b'{"type":"AckTimeout"}',
        b'{"type":"RateLimited","retry_after_s":2}',
        b'{"type":"RateLimited","retry_after_s":-1}',
        b'{"type":"RelayUnavailable"}',
        b'{"type":"PayloadTooLarge"}',
        b'{"type":"Exploded"}',
        b'"ok"',
        b"null",
        b"{}",
    ]
)


@st.composite
def reply_bodies(draw: st.DrawFn) -> bytes:
    """Reply bodies: valid batch answers, garbage JSON, unknown ack types,
    truncated and non-JSON bodies."""
    kind = draw(st.sampled_from(["batch", "sessions", "garbage", "truncated", "empty", "html"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"  ", b"\n"]))
    if kind == "html":
        return b"<html><body>502 Bad Gateway</body></html>"
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    ids = draw(st.lists(st.sampled_from([*REPLY_SESSIONS, "zz"]), max_size=4, unique=True))
    if kind == "sessions":
        entries = b",".join(b'"%s":%s' % (sid.encode(), draw(_ack_json)) for sid in ids)
        body = b'{"batch_id":%d,"sessions":{%s}}' % (draw(st.integers(0, 3)), entries)
    else:
        body = b'{"batch_id":%d,"ack":%s}' % (draw(st.integers(0, 3)), draw(_ack_json))
    if kind == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    return body


retry_after_values = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Wed, 21 Oct 2015 07:28:00",
            "Sun, 06 Nov 1994 08:49:37 +0100",
            "soon",
            "",
            "1e9",
            " 7 ",
        ]
    ),
    st.text(max_size=40),
)


@st.composite
def http_replies(draw: st.DrawFn) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) as a relay, a proxy or a broken server may send them."""
    status = draw(
        st.sampled_from([200, 201, 204, 299, 301, 400, 401, 403, 404, 408, 413, 418, 429, 500])
        | st.sampled_from([502, 503, 504])
        | st.integers(min_value=100, max_value=599)
    )
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["content-type"] = draw(
            st.sampled_from(["application/json", "text/html", "text/plain", "application/xml"])
        )
    if draw(st.booleans()):
        headers["retry-after"] = draw(retry_after_values)
    return status, headers, draw(reply_bodies())


socketio_replies = st.recursive(
    st.none()
    | st.text(max_size=20)
    | st.sampled_from(["ok", "RateLimited", "rate-limited", "TIMEOUT", "payload_too_large"])
    | st.integers()
    | st.floats(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["reason", "type", "sessions", "ack", "retry_after_s", "a", "b"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)


#: Operations that exercise blame: whole-batch failures, splits, throttles and
#: probes, on four sessions in one lane (tests/test_differential.py).
blame_operations: st.SearchStrategy[tuple[Any, ...]] = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from(["a", "b", "c", "d"]), st.just("incremental")),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 12.0, 40.0])),
    st.tuples(
        st.just("ack"),
        st.integers(0, 3),
        st.sampled_from(
            [
                acks.AckTimeout(),
                acks.RateLimited(),
                acks.RateLimited(retry_after_s=3.0),
                acks.PayloadTooLarge(),
                acks.Ok(),
            ]
        ),
    ),
)
