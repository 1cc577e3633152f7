"""Protocol v1 (engine/protocol.py): request/reply round trips and every malformed-input path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from engine import protocol as P

IDENTITY = b"\x00k\x8bEg"          # what a ROUTER prepends for a peer


def _header(**fields) -> bytes:
    h = {"v": 1, "id": 7, "method": "composite", "params": {}, "buffers": []}
    h.update(fields)
    return json.dumps(h).encode()


def _raises(body, code: str, *words: str, req_id=None, envelope=None) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_request(envelope or [IDENTITY], body)
    e = info.value
    assert e.code == code, f"code {e.code!r} ({e.message})"
    assert e.message == str(e)
    for w in words:
        assert w in e.message, f"{w!r} not in {e.message!r}"
    assert e.req_id == req_id
    return e


def _arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        ("audio_features", rng.standard_normal((3, 32, 16, 16)).astype(np.float32)),
        ("pcm", rng.integers(-32768, 32767, (5, 160), dtype=np.int16)),
        ("mask", rng.integers(0, 256, (2, 7, 3), dtype=np.uint8)),
    ]


# -- request round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("delimiter", [True, False], ids=["req-peer", "dealer-peer"])
@pytest.mark.parametrize("req_id", [7, "abc-1", None, 2.5, 2**40, True])
def test_request_round_trip(delimiter: bool, req_id) -> None:
    arrays = _arrays()
    params = {"model": "demo", "batch_size": 3, "start_frame": 10, "wrap": "modulo", "nested": {"a": [1, 2]}}
    frames = P.encode_request(req_id, "composite", params, arrays)
    assert len(frames) == 1 + len(arrays)
    routed = [IDENTITY, b"", *frames] if delimiter else [IDENTITY, *frames]

    envelope, body = P.split_envelope(routed)
    assert envelope == ([IDENTITY, b""] if delimiter else [IDENTITY])
    assert len(body) == 1 + len(arrays)

    req = P.parse_request(envelope, body)
    assert req.envelope == envelope
    assert req.id == req_id
    assert req.method == "composite"
    assert req.params == params
    assert list(req.buffers) == [name for name, _ in arrays]
    for name, arr in arrays:
        buf = req.buffers[name]
        assert buf.name == name
        assert buf.shape == arr.shape
        assert buf.nbytes == arr.nbytes
        out = buf.array()
        assert out.dtype == arr.dtype
        assert out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


def test_request_without_params_or_buffers() -> None:
    frames = P.encode_request("h", "health")
    assert len(frames) == 1
    header = json.loads(frames[0])
    assert header == {"v": 1, "id": "h", "method": "health", "params": {}, "buffers": []}
    req = P.parse_request([IDENTITY], frames)
    assert (req.id, req.method, req.params, req.buffers) == ("h", "health", {}, {})


def test_header_may_omit_params_and_buffers() -> None:
    req = P.parse_request([IDENTITY], [b'{"v": 1, "id": 1, "method": "models"}'])
    assert req.params == {} and req.buffers == {}


@pytest.mark.parametrize("method", P.METHODS)
def test_every_method_is_accepted(method: str) -> None:
    assert P.parse_request([], P.encode_request(1, method)).method == method


def test_encode_converts_non_contiguous_and_big_endian() -> None:
    base = np.arange(24, dtype=np.int16).reshape(4, 6)
    strided = base[:, ::2]                                 # not contiguous
    big = np.arange(6, dtype=">f4").reshape(2, 3)          # big-endian float32
    frames = P.encode_request(1, "infer", {}, [("s", strided), ("b", big)])
    header = json.loads(frames[0])
    assert header["buffers"] == [{"name": "s", "dtype": "int16", "shape": [4, 3]},
                                 {"name": "b", "dtype": "float32", "shape": [2, 3]}]
    req = P.parse_request([], frames)
    np.testing.assert_array_equal(req.buffers["s"].array(), strided)
    np.testing.assert_array_equal(req.buffers["b"].array(), big)
    assert req.buffers["b"].array().dtype == np.dtype("<f4")


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_, np.complex64])
def test_encode_rejects_unsupported_dtype(dtype) -> None:
    with pytest.raises(ValueError, match="bad"):
        P.encode_request(1, "infer", {}, [("bad", np.zeros(3, dtype))])


def test_encode_zero_size_buffer() -> None:
    """The parser accepts a zero dimension ("non-negative integers"), so the encoder must produce one."""
    empty = np.zeros((0, 16), np.float32)
    try:
        frames = P.encode_request(1, "infer", {}, [("audio_features", empty)])
    except TypeError as e:
        pytest.fail("ENGINE BUG engine/protocol.py encode_request: an array with a zero-length dimension "
                    f"(shape (0, 16)) raises TypeError from memoryview(arr).cast('B'): {e}")
    req = P.parse_request([], frames)
    assert req.buffers["audio_features"].array().shape == (0, 16)


def test_parse_accepts_zero_size_buffer() -> None:
    header = _header(buffers=[{"name": "e", "dtype": "uint8", "shape": [0, 4]}])
    req = P.parse_request([], [header, b""])
    assert req.buffers["e"].array().shape == (0, 4)
    assert req.buffers["e"].nbytes == 0


def test_parse_accepts_zmq_frames() -> None:
    frames = P.encode_request(3, "infer", {"model": "m"}, _arrays())
    zframes = [zmq.Frame(bytes(f)) for f in [IDENTITY, b"", *frames]]
    envelope, body = P.split_envelope(zframes)
    assert len(envelope) == 2
    req = P.parse_request([f.bytes for f in envelope], body)
    for name, arr in _arrays():
        assert req.buffers[name].nbytes == arr.nbytes
        np.testing.assert_array_equal(req.buffers[name].array(), arr)


@pytest.mark.parametrize("peer", [zmq.REQ, zmq.DEALER], ids=["REQ", "DEALER"])
def test_round_trip_over_real_router(peer: int) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    client = ctx.socket(peer)
    try:
        for s in (router, client):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 5000)
        router.bind("inproc://lse-proto-test")
        client.connect("inproc://lse-proto-test")
        arrays = _arrays()
        parts = P.encode_request("r1", "infer", {"model": "demo"}, arrays)
        client.send_multipart(parts if peer == zmq.REQ else [b"", *parts])
        frames = router.recv_multipart(copy=False)
        envelope, body = P.split_envelope(frames)
        assert len(envelope) == 2                      # identity + "" in both cases (the DEALER added it)
        req = P.parse_request([f.bytes for f in envelope], body)
        assert req.id == "r1"
        for name, arr in arrays:
            np.testing.assert_array_equal(req.buffers[name].array(), arr)

        out = np.arange(12, dtype=np.float32).reshape(2, 6)
        header = P.ok_reply(req.id, {"n": 1}, [{"name": "out", "dtype": "float32", "shape": [2, 6]}])
        router.send_multipart([*req.envelope, header, out])
        reply_frames = client.recv_multipart()
        if peer == zmq.DEALER:
            assert reply_frames[0] == b""
            reply_frames = reply_frames[1:]
        reply = P.parse_reply(reply_frames)
        assert reply.ok and reply.id == "r1" and reply.result == {"n": 1}
        desc, frame = reply.buffers[0]
        np.testing.assert_array_equal(np.frombuffer(frame, np.float32).reshape(desc["shape"]), out)
    finally:
        router.close()
        client.close()
        ctx.term()


# -- replies -------------------------------------------------------------------------------------
def test_ok_reply_round_trip_with_frame_counts() -> None:
    jpegs = [b"\xff\xd8jpeg%d\xff\xd9" % i for i in range(4)]
    out = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    descs = [{"name": "out", "dtype": "float32", "shape": [1, 2, 3]},
             {"name": "frames", "dtype": "jpeg", "count": 4}]
    header = P.ok_reply("id-9", {"gpu_id": 0, "frame_indices": [1, 2, 3, 4]}, descs)
    assert isinstance(header, bytes)
    reply = P.parse_reply([header, out.tobytes(), *jpegs])
    assert reply.ok and reply.status == "ok"
    assert reply.id == "id-9"
    assert reply.result == {"gpu_id": 0, "frame_indices": [1, 2, 3, 4]}
    assert reply.error is None
    assert len(reply.buffers) == 5
    assert reply.buffers[0][0]["name"] == "out"
    np.testing.assert_array_equal(np.frombuffer(reply.buffers[0][1], np.float32).reshape(1, 2, 3), out)
    assert [d["name"] for d, _ in reply.buffers[1:]] == ["frames"] * 4
    assert [f for _, f in reply.buffers[1:]] == jpegs


def test_ok_reply_without_buffers() -> None:
    header = P.ok_reply(5, {"models": ["a"]})
    assert json.loads(header) == {"v": 1, "id": 5, "status": "ok", "result": {"models": ["a"]}, "buffers": []}
    reply = P.parse_reply([zmq.Frame(header)])
    assert reply.ok and reply.id == 5 and reply.buffers == []


def test_error_reply_round_trip() -> None:
    header = P.error_reply("x", P.BUSY, "every ring slot is in use")
    reply = P.parse_reply([header])
    assert not reply.ok
    assert reply.status == "error"
    assert reply.id == "x"
    assert reply.error == {"code": "busy", "message": "every ring slot is in use"}
    assert reply.result == {}
    assert reply.buffers == []


def test_parse_reply_empty() -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_reply([])
    assert info.value.code == P.BAD_REQUEST


# -- malformed requests --------------------------------------------------------------------------
def test_empty_message() -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.split_envelope([])
    assert info.value.code == P.BAD_REQUEST
    assert "empty" in info.value.message
    assert info.value.req_id is None


def test_identity_only_has_no_header() -> None:
    envelope, body = P.split_envelope([IDENTITY])
    assert envelope == [IDENTITY] and body == []
    _raises(body, P.BAD_REQUEST, "no header")
    envelope, body = P.split_envelope([IDENTITY, b""])
    assert body == []
    _raises(body, P.BAD_REQUEST, "no header")


def test_header_not_utf8() -> None:
    _raises([b'{"v": 1, "id": "\xff\xfe"}'], P.BAD_REQUEST, "UTF-8")


@pytest.mark.parametrize("raw", [b"hello", b"", b"{'v': 1}", b"[1, 2", b"\x00"])
def test_header_not_json(raw: bytes) -> None:
    _raises([raw], P.BAD_REQUEST, "JSON")


def test_header_truncated_json() -> None:
    full = P.encode_request(1, "health")[0]
    _raises([full[:-5]], P.BAD_REQUEST, "JSON")


@pytest.mark.parametrize("raw", [b"[1, 2]", b"3", b'"str"', b"null", b"true"])
def test_header_not_an_object(raw: bytes) -> None:
    _raises([raw], P.BAD_REQUEST, "object")


def test_header_over_64k() -> None:
    params = {"pad": "x" * P.MAX_HEADER}
    raw = _header(params=params)
    assert len(raw) > P.MAX_HEADER
    e = _raises([raw], P.BAD_REQUEST, str(P.MAX_HEADER), str(len(raw)))
    assert e.req_id is None                      # not parsed at all


def test_header_of_exactly_64k_is_accepted() -> None:
    raw = _header(params={"pad": ""})
    raw = _header(params={"pad": "x" * (P.MAX_HEADER - len(raw))})
    assert len(raw) == P.MAX_HEADER
    assert P.parse_request([], [raw]).params["pad"].startswith("x")


@pytest.mark.parametrize("v", [2, 0, "1", None, [1]])
def test_wrong_version(v) -> None:
    _raises([_header(v=v)], P.UNSUPPORTED_VERSION, "version", repr(v), req_id=7)


def test_missing_version() -> None:
    raw = json.dumps({"id": "q", "method": "health"}).encode()
    _raises([raw], P.UNSUPPORTED_VERSION, "version", req_id="q")


@pytest.mark.parametrize("v", [True])
def test_version_must_be_the_integer_1(v) -> None:
    try:
        P.parse_request([], [_header(v=v)])
    except P.ProtocolError as e:
        assert e.code == P.UNSUPPORTED_VERSION
        return
    pytest.fail(f'ENGINE BUG engine/protocol.py parse_request (`header.get("v") != VERSION`): a header with '
                f'"v": {json.dumps(v)} is accepted as version 1, because {v!r} == 1 in Python; only the '
                "integer 1 should be")


def test_unknown_method() -> None:
    _raises([_header(method="render")], P.UNKNOWN_METHOD, "'render'", "composite", req_id=7)


@pytest.mark.parametrize("method", [None, 3, ["infer"]])
def test_method_not_a_string(method) -> None:
    _raises([_header(method=method)], P.BAD_REQUEST, "method", req_id=7)


def test_missing_method() -> None:
    _raises([b'{"v": 1, "id": "m"}'], P.BAD_REQUEST, "method", req_id="m")


@pytest.mark.parametrize("params", [[1], "x", 3, None])
def test_params_not_an_object(params) -> None:
    _raises([_header(params=params)], P.BAD_REQUEST, "params", req_id=7)


@pytest.mark.parametrize("buffers", [{"name": "a"}, "a", 1, None])
def test_buffers_not_a_list(buffers) -> None:
    _raises([_header(buffers=buffers)], P.BAD_REQUEST, "buffers", req_id=7)


def test_descriptor_count_differs_from_frames() -> None:
    desc = [{"name": "a", "dtype": "uint8", "shape": [2]}]
    _raises([_header(buffers=desc)], P.BAD_PAYLOAD, "1 buffers", "0 binary frames", req_id=7)
    _raises([_header(buffers=desc), b"ab", b"cd"], P.BAD_PAYLOAD, "1 buffers", "2 binary frames", req_id=7)
    _raises([_header(), b"ab"], P.BAD_PAYLOAD, "0 buffers", "1 binary frames", req_id=7)


@pytest.mark.parametrize("desc", [["a"], [{"dtype": "uint8", "shape": [1]}], [{"name": 5, "shape": [1]}], [None]])
def test_descriptor_not_an_object_with_name(desc) -> None:
    _raises([_header(buffers=desc), b"x"], P.BAD_PAYLOAD, "buffers[0]", req_id=7)


@pytest.mark.parametrize("dtype", ["float64", "int32", "jpeg", None, 4, {}, [], {"a": 1}, ["float32"]])
def test_unknown_dtype(dtype) -> None:
    desc = [{"name": "visual_frames", "dtype": dtype, "shape": [1]}]
    _raises([_header(buffers=desc), b"\0" * 8], P.BAD_PAYLOAD, "visual_frames", "dtype", req_id=7)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-1.0], [2.5], [True], [False, 2], "3", 3, None, [[1]], [None]])
def test_bad_shape(shape) -> None:
    desc = [{"name": "audio_features", "dtype": "uint8", "shape": shape}]
    _raises([_header(buffers=desc), b"\0"], P.BAD_PAYLOAD, "audio_features", "shape", req_id=7)


def test_missing_shape() -> None:
    desc = [{"name": "audio_features", "dtype": "uint8"}]
    _raises([_header(buffers=desc), b""], P.BAD_PAYLOAD, "audio_features", "shape", req_id=7)


@pytest.mark.parametrize("size", [0, 23, 25, 48])
def test_byte_size_mismatch(size: int) -> None:
    desc = [{"name": "audio_features", "dtype": "float32", "shape": [2, 3]}]
    _raises([_header(buffers=desc), b"\0" * size], P.BAD_PAYLOAD, "audio_features", f"{size} bytes", "24",
            req_id=7)


def test_duplicate_buffer_name() -> None:
    desc = [{"name": "audio_features", "dtype": "uint8", "shape": [1]},
            {"name": "audio_features", "dtype": "uint8", "shape": [1]}]
    _raises([_header(buffers=desc), b"a", b"b"], P.BAD_PAYLOAD, "audio_features", "twice", req_id=7)


def test_second_buffer_errors_name_it() -> None:
    desc = [{"name": "ok", "dtype": "uint8", "shape": [1]}, {"name": "visual_frames", "dtype": "int16", "shape": [2]}]
    _raises([_header(buffers=desc), b"a", b"abc"], P.BAD_PAYLOAD, "visual_frames", req_id=7)


@pytest.mark.parametrize("req_id", [[1], {"a": 1}, []])
def test_id_must_be_a_scalar(req_id) -> None:
    _raises([_header(id=req_id)], P.BAD_REQUEST, "id", req_id=None)


def test_id_is_checked_before_version() -> None:
    # an unusable id is not echoed even when the version is also wrong
    _raises([_header(id={"x": 1}, v=9)], P.BAD_REQUEST, "id", req_id=None)


def test_validation_order() -> None:
    """docs/protocol.md: size, UTF-8/JSON, object, id, v, method, params, buffers (count, then each in order)."""
    bad_desc = [{"name": "a", "dtype": "float64", "shape": [1]}, {"name": "b", "dtype": "uint8", "shape": [-1]}]
    _raises([_header(v=2, method="nope", params=[])], P.UNSUPPORTED_VERSION, "version", req_id=7)
    _raises([_header(method="nope", params=[])], P.UNKNOWN_METHOD, "nope", req_id=7)
    _raises([_header(params=[], buffers={})], P.BAD_REQUEST, "params", req_id=7)
    _raises([_header(buffers=bad_desc), b"x"], P.BAD_PAYLOAD, "2 buffers", req_id=7)
    _raises([_header(buffers=bad_desc), b"x", b""], P.BAD_PAYLOAD, "'a'", "dtype", req_id=7)


def test_unknown_header_and_descriptor_keys_are_ignored() -> None:
    desc = [{"name": "a", "dtype": "uint8", "shape": [2], "note": "x"}]
    req = P.parse_request([], [_header(buffers=desc, extra={"k": 1}), b"ab"])
    assert req.buffers["a"].array().tolist() == [97, 98]


def test_error_reply_always_speaks_version_1() -> None:
    assert json.loads(P.error_reply(None, P.UNSUPPORTED_VERSION, "x"))["v"] == 1


def test_every_readable_id_can_be_echoed() -> None:
    """Whatever id parse_request accepts (or carries in its error) must be encodable in the reply header.

    The front echoes ``e.req_id``/``req.id`` through error_reply/ok_reply, which use ``allow_nan=False``;
    Python's json.loads accepts NaN/Infinity/1e400 (-> inf), so a ValueError would escape Front.on_client's
    except-handler and take the front process down.
    """
    broken = []
    for raw_id in ("NaN", "Infinity", "-Infinity", "1e400"):
        for method in ("health", "no-such-method"):
            raw = f'{{"v": 1, "id": {raw_id}, "method": "{method}"}}'.encode()
            try:
                req = P.parse_request([IDENTITY], [raw])
                rid = req.id
            except P.ProtocolError as e:
                rid = e.req_id
            try:
                P.error_reply(rid, P.BAD_REQUEST, "x")
                P.ok_reply(rid, {})
            except ValueError as e:
                broken.append(f"id {raw_id} with method {method!r} -> req_id {rid!r}: {e}")
    if broken:
        pytest.fail("ENGINE BUG engine/protocol.py parse_request: json.loads accepts non-finite numbers, the id is "
                    "carried (in the Request or the ProtocolError), and error_reply/ok_reply (allow_nan=False) "
                    "then raise ValueError; in Front.on_client that happens inside the except handler, so one "
                    "such request crashes the front. parse_request should reject non-finite numbers "
                    "(json.loads parse_constant= for NaN/Infinity and a parse_float= check for overflows such "
                    "as 1e400) or not carry such an id. Cases:\n  " + "\n  ".join(broken))


def test_non_finite_params_do_not_break_messages() -> None:
    raw = b'{"v": 1, "id": 1, "method": "composite", "params": {"batch_size": NaN}}'
    try:
        req = P.parse_request([], [raw])
    except P.ProtocolError as e:
        assert e.code == P.BAD_REQUEST
        return
    with pytest.raises(P.ProtocolError) as info:
        P.check_int(req.params, "batch_size", 1, 50, req_id=req.id)
    P.error_reply(info.value.req_id, info.value.code, info.value.message)   # must be encodable


def test_error_message_is_json_encodable_for_bad_utf8_header() -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_request([], [b"\xff" * 10])
    json.loads(P.error_reply(info.value.req_id, info.value.code, info.value.message))


# -- check_int / check_str -----------------------------------------------------------------------
def _check_err(fn, *words: str, req_id=None) -> None:
    with pytest.raises(P.ProtocolError) as info:
        fn()
    assert info.value.code == P.BAD_REQUEST
    for w in words:
        assert w in info.value.message, f"{w!r} not in {info.value.message!r}"
    assert info.value.req_id == req_id


def test_check_int_ok() -> None:
    assert P.check_int({"batch_size": 5}, "batch_size", 1, 50) == 5
    assert P.check_int({"batch_size": 1}, "batch_size", 1, 50) == 1
    assert P.check_int({"batch_size": 50}, "batch_size", 1, 50) == 50
    assert P.check_int({}, "start_frame", 0, None, default=0) == 0
    assert P.check_int({"start_frame": 10**12}, "start_frame", 0, None) == 10**12


def test_check_int_missing() -> None:
    _check_err(lambda: P.check_int({}, "batch_size", 1, 50, req_id="r"), "params.batch_size", "required", req_id="r")
    _check_err(lambda: P.check_int({"batch_size": None}, "batch_size", 1, 50), "required")


@pytest.mark.parametrize("value", ["5", 5.5, [5], {"n": 5}, True, False])
def test_check_int_wrong_type(value) -> None:
    _check_err(lambda: P.check_int({"batch_size": value}, "batch_size", 0, 50, req_id=3),
               "params.batch_size", "integer", "0..50", repr(value), req_id=3)


@pytest.mark.parametrize("value", [0, -1, 51, 10**6])
def test_check_int_out_of_range(value: int) -> None:
    _check_err(lambda: P.check_int({"batch_size": value}, "batch_size", 1, 50), "params.batch_size", "1..50",
               str(value))


def test_check_int_open_range_message() -> None:
    _check_err(lambda: P.check_int({"start_frame": -1}, "start_frame", 0, None), "params.start_frame", ">= 0")


def test_check_str_ok() -> None:
    assert P.check_str({"model": "demo"}, "model") == "demo"
    assert P.check_str({}, "wrap", ("pingpong", "modulo"), default="modulo") == "modulo"
    assert P.check_str({"wrap": "pingpong"}, "wrap", ("pingpong", "modulo")) == "pingpong"


def test_check_str_missing() -> None:
    _check_err(lambda: P.check_str({}, "model", req_id=9), "params.model", "required", req_id=9)


@pytest.mark.parametrize("value", [3, True, ["demo"], {"a": 1}, ""])
def test_check_str_wrong_type_or_empty(value) -> None:
    _check_err(lambda: P.check_str({"model": value}, "model"), "params.model", "non-empty string")


def test_check_str_choices() -> None:
    _check_err(lambda: P.check_str({"wrap": "mirror"}, "wrap", ("pingpong", "modulo"), req_id="w"),
               "params.wrap", "one of pingpong, modulo", "'mirror'", req_id="w")


def test_all_codes_are_distinct_strings() -> None:
    codes = [P.BAD_REQUEST, P.BAD_PAYLOAD, P.UNKNOWN_METHOD, P.UNSUPPORTED_VERSION, P.UNKNOWN_MODEL, P.MODEL_ERROR,
             P.CAPACITY, P.BUSY, P.WORKER_DIED, P.SHUTTING_DOWN, P.INTERNAL]
    assert len(set(codes)) == len(codes)
    assert all(isinstance(c, str) and c for c in codes)


def test_an_integer_is_any_json_number_with_an_integral_value() -> None:
    """JSON has one number type: 2 and 2.0 are the same integer (a client in JavaScript or Go may
    write either); 2.5 is not an integer, and booleans never are."""
    assert P.check_int({"batch_size": 2.0}, "batch_size", 1, 50) == 2
    assert type(P.check_int({"batch_size": 2.0}, "batch_size", 1, 50)) is int
    req = P.parse_request([], [_header(v=1.0, buffers=[{"name": "a", "dtype": "uint8", "shape": [2.0, 1e0]}]),
                               b"\0\0"])
    assert req.buffers["a"].shape == (2, 1)
    _raises([_header(v=1.5)], P.UNSUPPORTED_VERSION, "version", req_id=7)


def test_check_bool() -> None:
    assert P.check_bool({}, "end", False) is False and P.check_bool({"end": None}, "end", True) is True
    _check_err(lambda: P.check_bool({"end": 1}, "end", False, req_id=4), "params.end", "true or false", req_id=4)


def test_error_events_have_the_error_shape() -> None:
    """Section 5: an error has no result and no buffers; events are no exception."""
    msg = json.loads(P.event_message("stream_error", "s1", error=("stream_timeout", "no audio")))
    assert msg == {"v": 1, "id": None, "event": "stream_error", "stream": "s1", "status": "error",
                   "error": {"code": "stream_timeout", "message": "no audio"}}
    ok = json.loads(P.event_message("frame", "s1", {"frame": 0}, [{"name": "frame", "dtype": "jpeg", "count": 1}]))
    assert ok["status"] == "ok" and ok["result"] == {"frame": 0} and ok["buffers"][0]["count"] == 1
