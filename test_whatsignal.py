"""Tests for whatsignal.py: real sockets, real SQLite files, fakes that speak the upstream contracts.

Run: python3 -m pytest -q test_whatsignal.py
"""
import ast
import base64
import binascii
import collections
import contextlib
import copy
import datetime
import glob
import hashlib
import hmac
import http.client
import http.server
import io
import json
import mimetypes
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
import uuid

import pytest
import whatsignal as ws

###############################################################################
# Fake upstreams (WAHA, signal-cli daemon, signal-cli-rest-api) and a fake clock ###
###############################################################################

# Fake upstream servers for the WhatSignal tests (standard library only, Python 3.9+).
# 
# FakeWaha          WAHA REST API (GOWS engine shapes) + helpers to post signed webhooks to the bridge.
# FakeSignalDaemon  signal-cli `daemon --http`: /api/v1/rpc (JSON-RPC 2.0), /api/v1/events (SSE), /api/v1/check.
# FakeSignalRest    bbernhard/signal-cli-rest-api: /v2/send, /v1/receive (polling or WebSocket), ...
# FakeClock         injectable time source.
# 
# Every server binds 127.0.0.1 port 0, speaks HTTP/1.1 with keep-alive, records each request in the
# thread-safe list `calls` ({"method","path","query","headers","json","body","status","response",...};
# `headers` is case-insensitive) and offers wait_for(predicate, timeout) which is always bounded.
# No module-level side effects: nothing starts until start() is called.



# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def _fake_dumps(obj):
    """Compact JSON, raw UTF-8 (what Node's JSON.stringify, Jackson and Go emit)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _fake_now_ms():
    return int(time.time() * 1000)


_FAKE_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _fake_ulid():
    """Lower-case ULID (26 Crockford base32 chars), as used in WAHA event ids."""
    n = (_fake_now_ms() << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_FAKE_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))


def _fake_shutdown_sock(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _fake_is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


_FAKE_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _fake_sniff(data):
    """Content sniffing roughly like gabriel-vasile/mimetype (used by signal-cli-rest-api)."""
    data = bytes(data)
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if data.startswith(b"OggS"):
        return "audio/ogg"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio/x-m4a"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    if data.startswith(b"ID3") or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if data.startswith(b"PK\x03\x04"):
        return "application/zip"
    try:
        data.decode("utf-8")
        return "text/plain; charset=utf-8"
    except UnicodeDecodeError:
        return "application/octet-stream"


class _FakeHeaders(dict):
    """Case-insensitive header dict; keys are stored lower-case, repeated headers are joined by ', '."""

    def __init__(self, pairs=()):
        super().__init__()
        for k, v in pairs:
            k = k.lower()
            if dict.__contains__(self, k):
                dict.__setitem__(self, k, dict.__getitem__(self, k) + ", " + v)
            else:
                dict.__setitem__(self, k, v)

    def __setitem__(self, k, v):
        dict.__setitem__(self, k.lower(), v)

    def __getitem__(self, k):
        return dict.__getitem__(self, k.lower())

    def __contains__(self, k):
        return isinstance(k, str) and dict.__contains__(self, k.lower())

    def get(self, k, default=None):
        return dict.get(self, k.lower(), default)


class _FakeHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):  # keep test output quiet
        pass


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return self.server.fake._server_header

    def log_message(self, format, *args):  # noqa: A002 - signature from the stdlib
        pass

    def setup(self):
        super().setup()
        if self.server.fake.nodelay:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fake_responded = False
        self.server.fake._conn_opened(self)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._conn_closed(self)

    def _fake_dispatch(self):
        self._fake_responded = False
        self.server.fake._dispatch(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _fake_dispatch


_FAKE_OMIT = object()


AT_REST_FAKES = []   # every fake made during the running test; see at_rest_check


class _FakeBase:
    """Server plumbing shared by all fakes (start/stop/url/calls/wait_for)."""

    _server_header = "Fake"
    nodelay = True     # Node (WAHA) and Go (signal-cli-rest-api) servers set TCP_NODELAY

    def __init__(self):
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        self._port = None
        self._conns = {}
        self._seq = 0
        self.calls = []
        self.server_errors = []  # tracebacks of exceptions inside the fake itself (should stay empty)
        self.slow_seconds = 2.0
        self.given = []          # what this fake handed the bridge unasked (webhooks, envelopes): see at_rest_check
        AT_REST_FAKES.append(self)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self):
        """Bind and serve in a daemon thread. After stop(), start() tries to reuse the same port."""
        with self._lock:
            if self._server is not None:
                return self
            self._stopping.clear()
            srv = None
            if self._port:
                try:
                    srv = _FakeHTTPServer(("127.0.0.1", self._port), _FakeHandler)
                except OSError:
                    srv = None
            if srv is None:
                srv = _FakeHTTPServer(("127.0.0.1", 0), _FakeHandler)
            srv.fake = self
            self._port = srv.server_address[1]
            self._server = srv
            self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="%s:%d" % (type(self).__name__, self._port), daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Stop serving, cut every open connection (including SSE/WebSocket streams), join threads.
        Bounded by `timeout` seconds in total. Idempotent."""
        with self._cond:
            srv, th = self._server, self._thread
            if srv is None:
                return
            self._server = None
            self._thread = None
            self._stopping.set()
            self._bump()
        deadline = time.monotonic() + timeout
        stopper = threading.Thread(target=srv.shutdown, daemon=True)
        stopper.start()
        # let streaming handlers (SSE / WebSocket) end themselves first (e.g. send a close frame)
        self.wait_for(lambda f: f._stream_count() == 0, min(0.5, timeout / 4.0))
        with self._lock:
            conns = list(self._conns.values())
        for sock, _thr in conns:
            _fake_shutdown_sock(sock)
        stopper.join(max(0.0, deadline - time.monotonic()))
        th.join(max(0.0, deadline - time.monotonic()))
        try:
            srv.server_close()
        except OSError:
            pass
        while time.monotonic() < deadline:
            with self._lock:
                conns = list(self._conns.values())
            if not conns:
                break
            for sock, thr in conns:
                _fake_shutdown_sock(sock)
                thr.join(max(0.0, min(0.2, deadline - time.monotonic())))
        with self._cond:
            self._bump()

    def _stream_count(self):
        return 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._port

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self._port

    @property
    def running(self):
        return self._server is not None

    # -- recording / waiting --------------------------------------------------------------------
    def wait_for(self, predicate, timeout=5.0):
        """Block until predicate(self) is truthy. It is re-checked whenever the fake records anything
        (Condition) and at least every 50 ms (for predicates on outside state). The predicate runs
        WITHOUT the fake's lock held, so it may talk to the bridge/fake. Exceptions count as False.
        Returns True/False; never waits longer than `timeout`."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            with self._cond:
                seq = self._seq
            try:
                if predicate(self):
                    return True
            except Exception:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                if self._seq == seq:
                    self._cond.wait(min(remaining, 0.05))

    def _bump(self):
        """Record a state change and wake waiters (caller holds the lock)."""
        self._seq += 1
        self._cond.notify_all()

    def calls_for(self, path_prefix=None, method=None):
        """Recorded calls filtered by path prefix and/or HTTP method."""
        with self._lock:
            return [c for c in self.calls
                    if (path_prefix is None or c["path"].startswith(path_prefix))
                    and (method is None or c["method"] == method.upper())]

    def clear(self):
        """Forget recorded calls."""
        with self._cond:
            del self.calls[:]
            self._bump()

    def _notify(self):
        with self._cond:
            self._bump()

    # -- connection tracking --------------------------------------------------------------------
    def _conn_opened(self, h):
        with self._lock:
            self._conns[h] = (h.connection, threading.current_thread())
            if self._stopping.is_set():
                _fake_shutdown_sock(h.connection)

    def _conn_closed(self, h):
        with self._cond:
            self._conns.pop(h, None)
            self._bump()

    # -- request plumbing -----------------------------------------------------------------------
    def _dispatch(self, h):
        try:
            self._handle(h)
        except (OSError, http.client.HTTPException):
            h.close_connection = True
        except Exception:
            with self._lock:
                self.server_errors.append(traceback.format_exc())
            h.close_connection = True
            if not h._fake_responded:
                try:
                    data = traceback.format_exc().encode("utf-8", "replace")
                    h.send_response(500)
                    h.send_header("Content-Type", "text/plain; charset=utf-8")
                    h.send_header("Content-Length", str(len(data)))
                    h.send_header("Connection", "close")
                    h.end_headers()
                    h.wfile.write(data)
                except OSError:
                    pass

    def _handle(self, h):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _read_body(h, headers):
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                line = h.rfile.readline(65537)
                if not line:
                    raise ConnectionAbortedError("truncated chunked body")
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise ConnectionAbortedError("bad chunk size")
                if size == 0:
                    while True:
                        t = h.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline(65537)
        cl = headers.get("content-length")
        if cl:
            try:
                n = int(cl)
            except ValueError:
                raise ConnectionAbortedError("bad Content-Length")
            data = h.rfile.read(n) if n > 0 else b""
            if len(data) != n:
                raise ConnectionAbortedError("truncated body")
            return data
        return b""

    def _begin(self, h, **extra):
        split = urllib.parse.urlsplit(h.path)
        parsed = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        query = {k: (v[0] if len(v) == 1 else v) for k, v in parsed.items()}
        headers = _FakeHeaders(h.headers.items())
        body = self._read_body(h, headers)
        js, json_error = None, None
        if body:
            try:
                js = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                json_error = str(e)
        call = {"method": h.command, "path": split.path, "query": query, "headers": headers,
                "json": js, "body": body, "status": None, "response": None, "time": time.time()}
        if json_error is not None:
            call["json_error"] = json_error
        call.update(extra)
        with self._cond:
            self.calls.append(call)
            self._bump()
        return call

    def _send_raw(self, h, call, status, data=b"", ctype=None, headers=None, close=False,
                  length=None, record=_FAKE_OMIT):
        """Write a complete response. `length`: None = real length, int = the Content-Length
        header to claim, False = omit the header (then the connection is closed after the body)."""
        data = bytes(data or b"")
        with self._cond:
            call["status"] = status
            call["response"] = data if record is _FAKE_OMIT else record
            self._bump()
        h._fake_responded = True
        h.send_response(status)
        if ctype:
            h.send_header("Content-Type", ctype)
        for k, v in (headers or ()):
            h.send_header(k, v)
        bodyless = status in (204, 304) or 100 <= status < 200
        if length is False:
            close = True
        elif not bodyless:
            h.send_header("Content-Length", str(len(data) if length is None else int(length)))
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if data and not bodyless and h.command != "HEAD":
            h.wfile.write(data)
        h.wfile.flush()

    def _send_json(self, h, call, status, obj, ctype="application/json; charset=utf-8", headers=None):
        self._send_raw(h, call, status, _fake_dumps(obj), ctype=ctype, headers=headers, record=obj)

    def _drop(self, h, call):
        """Close the connection without answering."""
        with self._cond:
            call["status"] = "dropped"
            self._bump()
        h._fake_responded = True
        h.close_connection = True
        _fake_shutdown_sock(h.connection)

    def _fault_gate(self, h, call, mode):
        """Common 'down'/'slow' behaviour. Returns False when the request was consumed."""
        if mode == "down":
            self._drop(h, call)
            return False
        if mode == "slow":
            if self._stopping.wait(max(0.0, float(self.slow_seconds))):
                self._drop(h, call)
                return False
        return True

    @staticmethod
    def _pop_scripted(queue, lock, match):
        with lock:
            for i, entry in enumerate(queue):
                if match(entry):
                    del queue[i]
                    return entry
        return None


# ----------------------------------------------------------------------------------------------
# WAHA
# ----------------------------------------------------------------------------------------------

_WAHA_SEND_PATHS = {"/api/sendText": "text", "/api/reply": "text", "/api/sendImage": "image",
                    "/api/sendFile": "file", "/api/sendVoice": "voice", "/api/sendVideo": "video"}


class FakeWaha(_FakeBase):
    """Fake WAHA (engine GOWS). See module docstring; public attributes:

    api_key, session, mode ("ok"|"down"|"error"|"slow"|"session_not_working"), slow_seconds,
    session_status ("WORKING" ...; anything else makes messaging endpoints answer 422),
    status_after_restart, me, engine, version, contacts {chatId: name | dict}, lids {lid: pn|None},
    files {"/api/files/...": bytes | {"body", "content_type", "lie_length", "no_length", "redirect_to"}},
    reaction messageIds of @g.us chats need the _participant suffix,
    engine ("GOWS" | "NOWEB" | "WEBJS": the shape of send responses and group info),
    old_core (a WAHA Core before 2026.6.1: media sends refused with 422 / 501),
    group_names {groupId: subject}, sessions (names served), refuse {path: (status, message)};
    a files entry {"status": N} is answered with that error status.
    """

    _server_header = "Express"

    def __init__(self, api_key="waha-key", session="default"):
        super().__init__()
        self.api_key = api_key
        self.session = session
        self.mode = "ok"
        self.slow_seconds = 2.0
        self.session_status = "WORKING"
        self.status_after_restart = "WORKING"
        self.engine = "GOWS"
        self.version = "2026.7.1"
        self.me = {"id": "15550000001@c.us", "pushName": "Bridge", "lid": "123456789012345@lid",
                   "jid": "15550000001:7@s.whatsapp.net"}
        self.contacts = {}
        self.lids = {}
        self.files = {}
        self.group_names = {}     # {groupId: subject} for GET /api/{session}/groups/{id}
        self.sessions = {session}  # session names this WAHA serves (all backed by the one fake account)
        self.refuse = {}          # {path: (status, message)}: answer every call of that path with this error
        self.session_config = None     # the session's config (config.webhooks ...), set by PUT /api/sessions/{s}
        self.restarts = 0              # restarts caused by a config change of a running session
        self.old_core = False
        self.next_ids = []      # bare ids the next sends get, in order (then random ones)
        self.history = {}   # chatId -> [WAMessage]: what GET /api/{session}/chats[/{id}/messages] serves
        self.poll_votes = True   # False: a Core image before 2026.6.1, where voting was a Plus feature
        self.participants = {}   # groupId -> [participant ids]: GET /api/{session}/groups/{id}/participants/v2

    # -- helpers for tests ----------------------------------------------------------------------
    def remember(self, payload):
        """Keep a WAMessage (a webhook payload) in the chat history WAHA serves, as WAHA stores every message.
        The chat is the second part of the serialized id."""
        chat = payload["id"].split("_")[1]
        with self._cond:
            self.history.setdefault(chat, []).append(copy.deepcopy(payload))
            self._bump()
        return payload

    def sent(self, kind=None):
        """JSON bodies of successfully answered (2xx) send calls, oldest first.
        kind=None: every /api/send* except /api/sendSeen; kind="text"/"sendText"/"image"/"seen"/...
        selects one endpoint."""
        want = None
        if kind is not None:
            k = kind.rsplit("/", 1)[-1].lower()
            if k.startswith("send"):
                k = k[4:]
            want = "/api/send" + k
        out = []
        with self._lock:
            for c in self.calls:
                p = c["path"]
                if not p.startswith("/api/send") or not _fake_is_int(c.get("status")):
                    continue
                if not 200 <= c["status"] < 300:
                    continue
                if want is None and p == "/api/sendSeen":
                    continue
                if want is not None and p.lower() != want:
                    continue
                out.append(c["json"])
        return out

    def add_file(self, name, data, content_type=None, **options):
        """Register a downloadable media file. `name` is either a full path ("/api/files/...")
        or a file name put under /api/files/<session>/. Returns the absolute URL."""
        path = name if name.startswith("/") else "/api/files/%s/%s" % (self.session, name)
        entry = {"body": bytes(data)}
        if content_type:
            entry["content_type"] = content_type
        entry.update(options)
        with self._lock:
            self.files[path] = entry
        return self.url + path

    @staticmethod
    def sign(body_bytes, secret):
        """hex(HMAC-SHA512(secret as UTF-8, exact body bytes)) - WAHA's X-Webhook-Hmac."""
        if isinstance(body_bytes, str):
            body_bytes = body_bytes.encode("utf-8")
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        return hmac.new(key, bytes(body_bytes), hashlib.sha512).hexdigest()

    def event(self, event, payload, **overrides):
        """Build a current-shape WAHA webhook envelope (evt_ ULID id, ms timestamp, me, environment)."""
        env = {"id": "evt_" + _fake_ulid(), "timestamp": _fake_now_ms(), "event": event,
               "session": self.session, "metadata": {}, "me": dict(self.me) if self.me else None,
               "payload": payload, "engine": self.engine,
               "environment": {"version": self.version, "engine": self.engine, "tier": "CORE",
                               "browser": None, "platform": "linux/x64", "worker": {"id": None}}}
        env.update(overrides)
        return env

    def webhook(self, url, event_dict, secret=None, headers=None, timeout=10.0):
        """POST one webhook like WAHA does. `event_dict` may be a dict (serialized compactly) or
        bytes/str (sent verbatim). `secret` None = no HMAC headers. `headers` overrides/adds headers;
        a None value removes a default header. Returns (status, parsed JSON body or text)."""
        self.given.append(event_dict)
        if isinstance(event_dict, (bytes, bytearray)):
            body = bytes(event_dict)
        elif isinstance(event_dict, str):
            body = event_dict.encode("utf-8")
        else:
            body = _fake_dumps(event_dict)
        hdrs = {"Content-Type": "application/json", "User-Agent": "WAHA/%s" % self.version,
                "X-Webhook-Request-Id": _fake_ulid(), "X-Webhook-Timestamp": str(_fake_now_ms())}
        if secret is not None:
            hdrs["X-Webhook-Hmac"] = self.sign(body, secret)
            hdrs["X-Webhook-Hmac-Algorithm"] = "sha512"
        for k, v in (headers or {}).items():
            for existing in [e for e in hdrs if e.lower() == k.lower()]:
                del hdrs[existing]
            if v is not None:
                hdrs[k] = v
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            conn.request("POST", target, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        finally:
            conn.close()
        text = data.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    # -- request handling -----------------------------------------------------------------------
    def _handle(self, h):
        call = self._begin(h)
        if not self._fault_gate(h, call, self.mode):
            return
        m, path = h.command, call["path"]
        segs = [urllib.parse.unquote(s) for s in path.split("/")[1:]]
        if self.mode == "error":
            return self._send_json(h, call, 500, self._nest_500(call))
        if path in self.refuse:
            # class-validator errors come back as 400 {statusCode, message: [..], error} (WAHA src/main.ts pipes)
            status, message = self.refuse[path]
            return self._send_json(h, call, status, {"statusCode": status, "message": [message],
                                                     "error": "Bad Request"})
        if m == "GET" and path == "/ping":
            return self._send_json(h, call, 200, {"message": "pong"})
        key = call["headers"].get("x-api-key")
        if key is None:
            key = call["query"].get("x-api-key")
        if key != self.api_key:
            return self._send_json(h, call, 401, {"message": "Unauthorized", "statusCode": 401})
        if call.get("json_error") is not None and m in ("POST", "PUT", "PATCH"):
            return self._bad_request(h, call, "Unexpected token in JSON body: %s" % call["json_error"], raw=True)

        if m == "GET" and path == "/health":
            return self._send_json(h, call, 200, {})
        if m == "GET" and path == "/api/server/version":
            return self._send_json(h, call, 200, {"version": self.version, "engine": self.engine,
                                                  "tier": "CORE", "browser": None})
        if m == "GET" and path.startswith("/api/files/"):
            return self._serve_file(h, call)
        if m == "POST" and path in _WAHA_SEND_PATHS:
            return self._send_message(h, call, _WAHA_SEND_PATHS[path])
        if m == "PUT" and path == "/api/reaction":
            return self._reaction(h, call)
        if m == "POST" and path == "/api/sendPollVote":
            return self._poll_vote(h, call)
        if m == "POST" and path == "/api/sendSeen":
            return self._chat_action(h, call, 201, {})
        if m == "POST" and path in ("/api/startTyping", "/api/stopTyping"):
            return self._chat_action(h, call, 201, {"result": True})
        if m == "GET" and path == "/api/contacts":
            return self._get_contact(h, call, call["query"].get("contactId"), call["query"].get("session"))
        if m == "GET" and path == "/api/contacts/all":
            if not self._session_gate(h, call, call["query"].get("session") or self.session):
                return
            with self._lock:
                ids = list(self.contacts)
            return self._send_json(h, call, 200, [self._contact(i) for i in ids])
        if m == "GET" and path == "/api/contacts/check-exists":
            phone = re.sub(r"\D", "", str(call["query"].get("phone") or ""))
            if not phone:
                return self._bad_request(h, call, "phone should not be empty")
            if not self._session_gate(h, call, call["query"].get("session") or self.session):
                return
            return self._send_json(h, call, 200, {"numberExists": True, "chatId": phone + "@c.us"})
        if len(segs) >= 2 and segs[0] == "api" and segs[1] == "sessions":
            return self._sessions(h, call, segs)
        if len(segs) == 6 and segs[0] == "api" and segs[2] == "chats" and segs[4] == "messages" \
                and m in ("PUT", "DELETE"):
            return self._edit_delete(h, call, segs)
        if m == "GET" and len(segs) == 4 and segs[0] == "api" and segs[2] == "lids":
            return self._lid(h, call, segs[1], segs[3])
        if m == "GET" and len(segs) == 5 and segs[0] == "api" and segs[2] == "lids" and segs[3] == "pn":
            return self._lid_by_pn(h, call, segs[1], segs[4])
        if m == "GET" and len(segs) == 4 and segs[0] == "api" and segs[2] == "contacts":
            return self._get_contact(h, call, segs[3], segs[1])
        if m == "GET" and len(segs) == 4 and segs[0] == "api" and segs[2] == "groups":
            return self._group(h, call, segs[1], segs[3])
        if m == "GET" and len(segs) == 6 and segs[0] == "api" and segs[2] == "groups" and segs[4:] == ["participants", "v2"]:
            # [{id, role}] (GOWS getGroupParticipants/ToGroupParticipants, src/core/engines/gows/groups.gows.ts)
            if not self._session_gate(h, call, segs[1]):
                return
            with self._lock:
                ids = list(self.participants.get(segs[3], []))
            return self._send_json(h, call, 200, [{"id": i, "role": "participant"} for i in ids])
        if m == "GET" and len(segs) == 3 and segs[0] == "api" and segs[2] == "chats":
            return self._chats(h, call, segs[1])
        if m == "GET" and len(segs) == 5 and segs[0] == "api" and segs[2] == "chats" and segs[4] == "messages":
            return self._chat_messages(h, call, segs[1], segs[3])
        return self._send_json(h, call, 404, {"message": "Cannot %s %s" % (m, path),
                                              "error": "Not Found", "statusCode": 404})

    # -- WAHA pieces ----------------------------------------------------------------------------
    def _nest_500(self, call):
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        return {"statusCode": 500, "timestamp": now.replace("+00:00", "Z"),
                "exception": {"message": "Fake WAHA internal error", "name": "Error",
                              "stack": "Error: Fake WAHA internal error\n    at FakeWaha"},
                "request": {"path": call["path"], "method": call["method"],
                            "body": call["json"] if call["json"] is not None else {}, "query": call["query"]},
                "version": {"version": self.version, "engine": self.engine, "tier": "CORE", "browser": None}}

    def _bad_request(self, h, call, messages, raw=False):
        if isinstance(messages, str) and not raw:
            messages = [messages]
        return self._send_json(h, call, 400, {"statusCode": 400, "message": messages, "error": "Bad Request"})

    def _session_gate(self, h, call, name):
        """404 for an unknown session, 422 when the session is not WORKING."""
        if name != self.session and name not in self.sessions:
            self._session_404(h, call, name)
            return False
        status = self.session_status
        if self.mode == "session_not_working" or status != "WORKING":
            self._send_json(h, call, 422, {
                "error": "Session status is not as expected. Try again later or restart the session",
                "session": name, "status": status if status != "WORKING" else "STARTING",
                "expected": ["WORKING"]})
            return False
        return True

    def _session_404(self, h, call, name):
        self._send_json(h, call, 404, {
            "statusCode": 404,
            "message": "We didn't find a session with name '%s'. Please start it first by using "
                       "POST /api/sessions/%s/start request" % (name, name),
            "error": "Not Found"})

    @staticmethod
    def _norm_chat(chat_id):
        return chat_id if "@" in chat_id else re.sub(r"\D", "", chat_id) + "@c.us"

    def _new_id(self, chat_id):
        with self._lock:
            bare = self.next_ids.pop(0) if self.next_ids else os.urandom(10).hex().upper()
        wa = "true_%s_%s" % (chat_id, bare)
        # NOWEB's buildMessageId has three parts only (src/core/engines/noweb/session.noweb.core.ts)
        if chat_id.endswith("@g.us") and self.me and self.me.get("id") and self.engine != "NOWEB":
            wa += "_" + self.me["id"]  # GOWS adds the participant (me) for group messages
        return wa

    @staticmethod
    def parse_message_id(message_id):
        """Split a serialized id: returns (fromMe bool, chatId, waId, participant|None) or None."""
        if not isinstance(message_id, str):
            return None
        parts = message_id.split("_")
        if len(parts) not in (3, 4) or parts[0] not in ("true", "false") or "@" not in parts[1] or not parts[2]:
            return None
        return parts[0] == "true", parts[1], parts[2], (parts[3] if len(parts) == 4 else None)

    def _validate_send(self, kind, b):
        if not isinstance(b, dict):
            return ["body must be a JSON object"]
        errs = []
        if not isinstance(b.get("chatId"), str) or not b.get("chatId"):
            errs.append("chatId must be a string")
        if not isinstance(b.get("session"), str) or not b.get("session"):
            errs.append("session must be a string")
        if "reply_to" in b and b["reply_to"] is not None and not isinstance(b["reply_to"], str):
            errs.append("reply_to must be a string")
        if kind == "text":
            if not isinstance(b.get("text"), str):
                errs.append("text must be a string")
            mentions = b.get("mentions")   # ["2132132130@c.us"] or ["all"] (docs send-messages; GOWS: toJID each)
            if mentions is not None and not (isinstance(mentions, list) and all(isinstance(x, str) for x in mentions)):
                errs.append("mentions must be an array of strings")
            return errs
        if kind in ("voice", "video") and not isinstance(b.get("convert"), bool):
            errs.append("convert must be a boolean value")
        if "caption" in b and b["caption"] is not None and not isinstance(b["caption"], str):
            errs.append("caption must be a string")
        f = b.get("file")
        if not isinstance(f, dict):
            errs.append("file must be an object with mimetype and data or url")
            return errs
        if not isinstance(f.get("mimetype"), str) or not f.get("mimetype"):
            errs.append("file.mimetype must be a string")
        has_data = isinstance(f.get("data"), str)
        has_url = isinstance(f.get("url"), str) and bool(f.get("url"))
        if not has_data and not has_url:
            errs.append("file must contain either data (base64) or url")
        if has_data:
            if f["data"].startswith("data:"):
                errs.append("file.data must be plain base64, not a data URI")
            else:
                try:
                    base64.b64decode(f["data"], validate=True)
                except (binascii.Error, ValueError):
                    errs.append("file.data must be base64 encoded")
        return errs

    def _send_message(self, h, call, kind):
        b = call["json"]
        errs = self._validate_send(kind, b)
        if errs:
            return self._bad_request(h, call, errs)
        if not self._session_gate(h, call, b["session"]):
            return
        if self.old_core and kind in ("image", "file", "voice"):
            # src/core/exceptions.ts AvailableInPlusVersion (422), thrown by every engine's sendImage/File/Voice in Core
            return self._send_json(h, call, 422, {
                "message": "The feature is available only in Plus version for '%s' engine. Check this out: "
                           "https://waha.devlike.pro/" % self.engine,
                "error": "Unprocessable Entity", "statusCode": 422})
        if self.old_core and kind == "video":
            # src/core/abc/session.abc.ts sendVideo -> src/core/exceptions.ts NotImplementedByEngineError (501)
            return self._send_json(h, call, 501, {
                "message": "The method is not implemented by '%s' engine. Check the docs and try another engine: "
                           "https://waha.devlike.pro/" % self.engine,
                "error": "Not Implemented", "statusCode": 501})
        chat = self._norm_chat(b["chatId"])
        if kind != "text" and isinstance(b["file"].get("data"), str):
            call["file_bytes"] = base64.b64decode(b["file"]["data"])
        wa = self._new_id(chat)
        call["kind"] = kind
        call["wa_id"] = wa
        return self._send_json(h, call, 201, self.message_response(chat, wa, b.get("text") or b.get("caption")))

    def message_response(self, chat, wa, text=None):
        """What a send (or reaction, edit, delete) answers, in the shape of self.engine (waha.md 5.2)."""
        _fm, _chat, bare, part = self.parse_message_id(wa)
        now = int(time.time())
        if self.engine == "WEBJS":
            # src/core/engines/webjs/session.webjs.core.ts sendText: whatsapp-web.js's Message, id an object
            mid = {"fromMe": True, "remote": chat, "id": bare, "_serialized": wa}
            if part:
                mid["participant"] = part
            return {"_data": {"id": mid, "body": text, "type": "chat", "t": now, "from": self.me["id"], "to": chat,
                              "self": "out", "ack": 0}, "id": mid, "ack": 0, "hasMedia": False, "body": text,
                    "type": "chat", "timestamp": now, "from": self.me["id"], "to": chat, "deviceType": "web",
                    "isForwarded": False, "hasQuotedMsg": False}
        if self.engine == "NOWEB":
            # src/core/engines/noweb/session.noweb.core.ts sendText: Baileys' sendMessage() result, the raw message
            return {"key": {"remoteJid": chat.replace("@c.us", "@s.whatsapp.net"), "fromMe": True, "id": bare},
                    "message": {"extendedTextMessage": {"text": text}}, "messageTimestamp": str(now), "status": "PENDING"}
        # src/core/engines/gows/session.gows.core.ts messageResponse(): {id: serialized, _data}
        return {"id": wa, "_data": {}}

    def group_info(self, gid, name):
        """GET /api/{session}/groups/{id} in the shape of self.engine (upstream-behaviours.md, WAHA section)."""
        if self.engine == "GOWS":
            # src/core/engines/gows/session.gows.core.ts getGroup(): whatsmeow's GroupInfo as is
            return {"JID": gid, "OwnerJID": "", "Name": name, "NameSetAt": "2026-01-02T10:00:00Z",
                    "NameSetBy": "", "Topic": "", "TopicID": "", "IsLocked": False, "IsAnnounce": False,
                    "IsEphemeral": False, "Participants": [], "ParticipantVersionID": "", "IsParent": False}
        if self.engine == "NOWEB":
            # src/core/engines/noweb/session.noweb.core.ts getGroup(): Baileys' GroupMetadata
            return {"id": gid, "subject": name, "subjectOwner": None, "subjectTime": 1767348000, "size": 0,
                    "creation": 1767348000, "owner": None, "desc": None, "restrict": False, "announce": False,
                    "participants": []}
        # src/core/engines/webjs/session.webjs.core.ts getGroup(): whatsapp-web.js's GroupChat
        user = gid.split("@")[0]
        return {"id": {"server": "g.us", "user": user, "_serialized": gid}, "name": name, "isGroup": True,
                "isReadOnly": False, "unreadCount": 0, "timestamp": 1767348000, "archived": False, "pinned": False,
                "isMuted": False, "muteExpiration": 0,
                "groupMetadata": {"id": {"server": "g.us", "user": user, "_serialized": gid}, "subject": name,
                                  "creation": 1767348000, "desc": None, "participants": []}}

    def _chat_action(self, h, call, status, response):
        b = call["json"]
        errs = []
        if not isinstance(b, dict):
            errs.append("body must be a JSON object")
        else:
            if not isinstance(b.get("chatId"), str) or not b.get("chatId"):
                errs.append("chatId must be a string")
            if not isinstance(b.get("session"), str) or not b.get("session"):
                errs.append("session must be a string")
            ids = b.get("messageIds")
            if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                errs.append("messageIds must be an array of strings")
        if errs:
            return self._bad_request(h, call, errs)
        if not self._session_gate(h, call, b["session"]):
            return
        return self._send_json(h, call, status, response)

    def _reaction(self, h, call):
        b = call["json"]
        errs = []
        if not isinstance(b, dict):
            errs.append("body must be a JSON object")
        else:
            if not isinstance(b.get("messageId"), str) or not b.get("messageId"):
                errs.append("messageId must be a string")
            if not isinstance(b.get("reaction"), str):
                errs.append("reaction must be a string")
            if not isinstance(b.get("session"), str) or not b.get("session"):
                errs.append("session must be a string")
        if not errs:
            parsed = self.parse_message_id(b["messageId"])
            if parsed is None:
                errs.append("messageId must be a serialized id {fromMe}_{chatId}_{messageId}[_{participant}]")
            elif parsed[1].endswith("@g.us") and parsed[3] is None:
                errs.append("messageId of a group message must include the _{participant} suffix")
        if errs:
            return self._bad_request(h, call, errs)
        if not self._session_gate(h, call, b["session"]):
            return
        chat = self.parse_message_id(b["messageId"])[1]
        call["chatId"] = chat
        return self._send_json(h, call, 200, self.message_response(chat, self._new_id(chat)))

    # MessagePollVoteRequest {chatId, pollMessageId, votes: [option names], session}; GOWS sends it with the bare
    # poll id, and Core before 2026.6.1 answered AvailableInPlusVersion ("Poll voting") with 422
    # (src/core/engines/gows/session.gows.core.ts sendPollVote, src/core/exceptions.ts)
    def _poll_vote(self, h, call):
        b = call["json"]
        if not isinstance(b, dict) or not isinstance(b.get("chatId"), str) or not isinstance(b.get("session"), str) \
                or not isinstance(b.get("pollMessageId"), str) or not isinstance(b.get("votes"), list) \
                or not all(isinstance(v, str) for v in b["votes"]):
            return self._bad_request(h, call, "chatId, pollMessageId, session (strings) and votes (array of strings)")
        if not self._session_gate(h, call, b["session"]):
            return
        if not self.poll_votes:
            return self._send_json(h, call, 422, {
                "statusCode": 422, "error": "Unprocessable Entity",
                "message": "Poll voting - The feature is available only in Plus version for '%s' engine. "
                           "Check this out: https://waha.devlike.pro/" % self.engine})
        chat = self._norm_chat(b["chatId"])
        return self._send_json(h, call, 201, {"id": self._new_id(chat), "_data": {}})

    def _edit_delete(self, h, call, segs):
        session, chat, mid = segs[1], segs[3], segs[5]
        call["chatId"] = chat
        call["messageId"] = mid
        if call["method"] == "PUT":
            b = call["json"]
            if not isinstance(b, dict) or not isinstance(b.get("text"), str):
                return self._bad_request(h, call, "text must be a string")
        if not self._session_gate(h, call, session):
            return
        chat = self._norm_chat(chat)
        return self._send_json(h, call, 200, self.message_response(chat, self._new_id(chat)))

    def _contact(self, cid):
        cid = self._norm_chat(cid)
        with self._lock:
            entry = self.contacts.get(cid)
        contact = {"id": cid, "number": cid.split("@")[0], "name": None, "pushname": None,
                   "shortName": None, "isMe": bool(self.me and self.me.get("id") == cid),
                   "isGroup": cid.endswith("@g.us"), "isWAContact": True,
                   "isMyContact": entry is not None, "isBlocked": False}
        if isinstance(entry, dict):
            contact.update(entry)
        elif entry is not None:
            contact["name"] = entry
        return contact

    def _get_contact(self, h, call, contact_id, session):
        if not contact_id:
            return self._bad_request(h, call, "contactId should not be empty")
        if not self._session_gate(h, call, session or self.session):
            return
        return self._send_json(h, call, 200, self._contact(contact_id))

    def _lid(self, h, call, session, lid):
        if not self._session_gate(h, call, session):
            return
        lid = lid if "@" in lid else lid + "@lid"
        with self._lock:
            pn = self.lids.get(lid)
        return self._send_json(h, call, 200, {"lid": lid, "pn": pn})

    def _lid_by_pn(self, h, call, session, pn):
        if not self._session_gate(h, call, session):
            return
        pn = self._norm_chat(pn)
        with self._lock:
            lid = next((k for k, v in self.lids.items() if v == pn), None)
        return self._send_json(h, call, 200, {"lid": lid, "pn": pn})

    # GOWS getChats/toWAChat: {id, name, conversationTimestamp (s)}; sortBy conversationTimestamp|id|name,
    # sortOrder desc|asc (asc when absent), limit/offset (src/core/engines/gows/session.gows.core.ts)
    def _chats(self, h, call, session):
        if not self._session_gate(h, call, session):
            return
        q = call["query"]
        with self._lock:
            chats = [{"id": c, "name": None, "conversationTimestamp": max(int(m["timestamp"]) for m in msgs)}
                     for c, msgs in self.history.items() if msgs]
        key = {"conversationTimestamp": "conversationTimestamp", "name": "name"}.get(q.get("sortBy"), "id")
        chats.sort(key=lambda c: (c[key] is None, c[key] or 0), reverse=q.get("sortOrder") == "desc")
        offset = int(q.get("offset") or 0)
        limit = int(q["limit"]) if q.get("limit") else None
        return self._send_json(h, call, 200, chats[offset:offset + limit if limit else None])

    # GOWS getChatMessages: filter.timestamp.gte/lte (s, inclusive), filter.fromMe, sortBy timestamp, sortOrder
    # desc unless "asc", limit (GetChatMessagesQuery default 10), offset, downloadMedia (media null when false);
    # `source` exists in events only (src/core/engines/gows/session.gows.core.ts, src/structures/chats.dto.ts)
    def _chat_messages(self, h, call, session, chat):
        if not self._session_gate(h, call, session):
            return
        q = call["query"]
        try:
            gte = int(q["filter.timestamp.gte"]) if "filter.timestamp.gte" in q else None
            lte = int(q["filter.timestamp.lte"]) if "filter.timestamp.lte" in q else None
            limit, offset = int(q.get("limit") or 10), int(q.get("offset") or 0)
        except ValueError:
            return self._bad_request(h, call, "limit, offset and filter.timestamp.* must be numbers")
        with self._lock:
            msgs = [copy.deepcopy(m) for m in self.history.get(self._norm_chat(chat), [])]
        msgs = [m for m in msgs if (gte is None or m["timestamp"] >= gte) and (lte is None or m["timestamp"] <= lte)]
        if "filter.fromMe" in q:
            msgs = [m for m in msgs if bool(m.get("fromMe")) == (q["filter.fromMe"] == "true")]
        msgs.sort(key=lambda m: m["timestamp"], reverse=q.get("sortOrder") != "asc")
        for m in msgs:
            m.pop("source", None)
            if q.get("downloadMedia") == "false":
                m["media"] = None
        return self._send_json(h, call, 200, msgs[offset:offset + limit])

    def _group(self, h, call, session, gid):
        # GET /api/{session}/groups/{id} (WAHA src/api/groups.controller.ts), in the engine's shape
        if not self._session_gate(h, call, session):
            return
        with self._lock:
            name = self.group_names.get(gid)
        if name is None:
            return self._send_json(h, call, 404, {"statusCode": 404, "message": "Group not found", "error": "Not Found"})
        return self._send_json(h, call, 200, self.group_info(gid, name))

    def _session_info(self):
        return {"name": self.session, "status": self.session_status, "config": copy.deepcopy(self.session_config),
                "me": dict(self.me) if self.me else None, "engine": {"engine": self.engine},
                "presence": None, "timestamps": {"activity": None}}

    def _sessions(self, h, call, segs):
        m = call["method"]
        if len(segs) == 2 and m == "GET":
            show = self.session_status != "STOPPED" or call["query"].get("all") in ("true", "1")
            return self._send_json(h, call, 200, [self._session_info()] if show else [])
        if len(segs) < 3:
            return self._send_json(h, call, 404, {"message": "Cannot %s %s" % (m, call["path"]),
                                                  "error": "Not Found", "statusCode": 404})
        name = segs[2]
        if name != self.session:
            return self._session_404(h, call, name)
        if len(segs) == 3 and m == "GET":
            return self._send_json(h, call, 200, self._session_info())
        if len(segs) == 3 and m == "PUT":
            return self._update_session(h, call, name)
        if len(segs) == 4 and m == "GET" and segs[3] == "me":
            me = dict(self.me) if (self.me and self.session_status == "WORKING") else None
            return self._send_json(h, call, 200, me)
        if len(segs) == 4 and m == "POST" and segs[3] in ("start", "restart", "stop"):
            status = "STOPPED" if segs[3] == "stop" else "STARTING"
            with self._cond:
                self.session_status = status if segs[3] == "stop" else self.status_after_restart
            return self._send_json(h, call, 201, {"name": name, "status": status, "config": None})
        return self._send_json(h, call, 404, {"message": "Cannot %s %s" % (m, call["path"]),
                                              "error": "Not Found", "statusCode": 404})

    def _update_session(self, h, call, name):
        # src/api/sessions.controller.ts (update): the body's config replaces the stored one whole; a running
        # session is stopped, updated and started again; the answer is the SessionDTO (200)
        body = call["json"]
        config = body.get("config") if isinstance(body, dict) else None
        if not isinstance(body, dict) or (config is not None and not isinstance(config, dict)):
            return self._bad_request(h, call, "config must be an object")
        hooks = (config or {}).get("webhooks")
        if hooks is not None and not isinstance(hooks, list):
            return self._bad_request(h, call, "config.webhooks must be an array")
        for i, w in enumerate(hooks or []):
            if not isinstance(w, dict) or not isinstance(w.get("url"), str):
                return self._bad_request(h, call, "config.webhooks.%d.url must be a string" % i)
            if not isinstance(w.get("events"), list):
                return self._bad_request(h, call, "config.webhooks.%d.events must be an array" % i)
        stored = copy.deepcopy(config)
        for w in (stored or {}).get("webhooks") or []:
            for part in ("hmac", "retries", "customHeaders"):   # waha.md 2.1: unset parts come back as null
                w.setdefault(part, None)
        with self._cond:
            if self.session_status != "STOPPED":
                self.restarts += 1
                if self.session_status == "WORKING":
                    self.session_status = self.status_after_restart
            self.session_config = stored
            self._bump()
            status = self.session_status
        return self._send_json(h, call, 200, {"name": name, "status": status, "config": copy.deepcopy(stored)})

    def _serve_file(self, h, call):
        path = call["path"]
        with self._lock:
            entry = self.files.get(path)
            if entry is None:
                entry = self.files.get(urllib.parse.unquote(path))
        if entry is None:
            return self._send_json(h, call, 404, {"error": {
                "code": 404, "key": "FILE_NOT_FOUND", "message": "File not found",
                "details": "File not found or no longer available"}})
        if isinstance(entry, (bytes, bytearray)):
            entry = {"body": bytes(entry)}
        if entry.get("status"):
            return self._send_json(h, call, entry["status"], {"statusCode": entry["status"], "message": "busy"})
        if entry.get("redirect_to"):
            return self._send_raw(h, call, 302, b"", headers=[("Location", entry["redirect_to"])])
        data = bytes(entry.get("body", b""))
        ctype = entry.get("content_type") or mimetypes.guess_type(path)[0] or "application/octet-stream"
        if entry.get("lie_length") is not None:
            # Claim a (large) Content-Length, send the real (shorter) body, then close.
            return self._send_raw(h, call, 200, data, ctype=ctype, length=int(entry["lie_length"]),
                                  close=True, record=b"")
        if entry.get("no_length"):
            return self._send_raw(h, call, 200, data, ctype=ctype, length=False, record=b"")
        return self._send_raw(h, call, 200, data, ctype=ctype, record=b"")


# ----------------------------------------------------------------------------------------------
# signal-cli daemon --http
# ----------------------------------------------------------------------------------------------

class _FakeRpcError(Exception):
    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


_FAKE_SAMPLE_UUIDS = {
    "+15550000001": "0d1c2b3a-4f5e-4a6b-8c7d-9e0f1a2b3c4d",
    "+15550000002": "a1b2c3d4-e5f6-4a1b-9c2d-3e4f5a6b7c8d",
    "+15550000003": "b1c2d3e4-f5a6-4b1c-8d2e-3f4a5b6c7d8e",
}

_FAKE_DATA_URI_RE = re.compile(
    r"\Adata:(?P<type>.+?/.+?)?(?P<parameters>;.+?=.+?)?(?P<base64>;base64)?,(?P<data>.+)\Z", re.I)

_FAKE_DATA_URI_PARAM_RE = re.compile(r"\A;(?P<key>.+)=(?P<value>.+)", re.I)   # greedy, like PARAMETER_PATTERN

_FAKE_JACKSON_MAX_STRING = 20000000   # Jackson's default maxStringLength (StreamReadConstraints)


def _fake_java_url_decode(value):
    """java.net.URLDecoder.decode(value, UTF_8): '+' is a space; a bad '%' escape raises ValueError."""
    out, i = bytearray(), 0
    raw = value.encode("utf-8")
    while i < len(raw):
        c = raw[i:i + 1]
        if c == b"+":
            out += b" "
            i += 1
        elif c == b"%":
            hx = raw[i + 1:i + 3]
            if len(hx) < 2 or not re.match(rb"\A[0-9A-Fa-f]{2}\Z", hx):
                raise ValueError("URLDecoder: Illegal hex characters in escape (%) pattern")
            out.append(int(hx, 16))
            i += 3
        else:
            out += c
            i += 1
    return out.decode("utf-8", "replace")


def _fake_longest_string(obj):
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return max([_fake_longest_string(k) for k in obj] + [_fake_longest_string(v) for v in obj.values()] + [0])
    if isinstance(obj, list):
        return max([_fake_longest_string(v) for v in obj] + [0])
    return 0


_FAKE_SEND_TYPE_METHODS = ("send", "sendReaction", "remoteDelete", "sendTyping", "sendReceipt", "updateGroup")


def _fake_java_cast_error(value):
    java = {str: "java.lang.String", float: "java.lang.Double", bool: "java.lang.Boolean",
            list: "java.util.ArrayList", dict: "java.util.LinkedHashMap"}.get(type(value), "java.lang.Object")
    return ("class %s cannot be cast to class java.lang.Long (%s and java.lang.Long are in module "
            "java.base of loader 'bootstrap')" % (java, java))


class _FakeSseStream:
    def __init__(self, h):
        self.h = h
        self.queue = collections.deque()
        self.cut = None
        self.close = False
        self.gone = False


class FakeSignalDaemon(_FakeBase):
    """Fake signal-cli `daemon --http` (single-account mode). Public attributes:

    number, uuid, mode ("ok"|"down"|"slow"|"http500"), slow_seconds, errors (deque of
    (code, message[, method[, data]]) scripted JSON-RPC errors), keepalive_seconds (SSE),
    receive_mode ("on-connection" holds pushes until a stream connects | "on-start" drops them),
    a foreign Host header gets 421, bound_port (the port the daemon believes it is bound to, as behind
    a published Docker port; None = its real one), identities {number: trustLevel}, unregistered (numbers Signal
    does not know; getUserStatus), SSE is sent chunked like the JDK
    server, attachments {id: bytes}, contacts {number: name | dict}, groups {groupId: {...}},
    uuids {number: uuid}, recipient_results {recipient|groupId: failure type},
    rpc (list of per-JSON-RPC-request records), pending (deque held for the next stream),
    delivered (objects written to a stream), dropped (count), trusted (list).
    """

    _server_header = "signal-cli-fake"
    VERSION = "0.14.6"
    # the JDK's com.sun.net.httpserver leaves Nagle on (sun.net.httpserver.nodelay is false) and writes a
    # response's headers, then its body: _send_raw writes the same two pieces (HttpServerHandler.java)
    nodelay = False

    def __init__(self, number="+15550000001"):
        super().__init__()
        self.number = number
        self.uuid = _FAKE_SAMPLE_UUIDS.get(number) or str(uuid.uuid5(uuid.NAMESPACE_URL, "signal:" + number))
        self.mode = "ok"
        self.slow_seconds = 2.0
        self.errors = collections.deque()
        self.keepalive_seconds = 15.0
        self.receive_mode = "on-connection"
        self.bound_port = None
        self.identities = {}
        self.unregistered = set()
        self.attachments = {}
        self.contacts = {}
        self.groups = {}
        self.uuids = dict(_FAKE_SAMPLE_UUIDS)
        self.recipient_results = {}
        self.rpc = []
        self.pending = collections.deque()
        self.delivered = []
        self.delivered_on = []     # per delivered envelope: the serial of the SSE stream it was written to (0: receive)
        self.sse_streams = 0       # SSE streams opened so far
        self.dropped = 0
        self.trusted = []
        self.connections_opened = 0
        self.captcha_token = None          # rate-limit results carry this challenge token when set
        self.retry_after_seconds = 60      # ... and this retryAfterSeconds (None: absent)
        self.untrusted_senders = set()   # senders whose new identity key is not trusted (receive fails)
        self.held = []                   # their messages, delivered again after `trust`
        self.accounts = None          # started without -a: the accounts it serves (then "account" is a param)
        self.bind_host = "127.0.0.1"  # what `--http HOST:PORT` named; "0.0.0.0" turns the Host check off
        self._streams = []
        self._last_ts = 0
        self._methods = {
            "send": self._m_send, "sendReaction": self._m_send_reaction, "remoteDelete": self._m_remote_delete,
            "sendTyping": self._m_send_typing, "sendReceipt": self._m_send_receipt,
            "getAttachment": self._m_get_attachment, "listContacts": self._m_list_contacts,
            "listGroups": self._m_list_groups, "updateGroup": self._m_update_group,
            "version": self._m_version, "trust": self._m_trust, "receive": self._m_receive,
            "listIdentities": self._m_list_identities, "getUserStatus": self._m_get_user_status,
        }

    # -- public helpers -------------------------------------------------------------------------
    @property
    def stream_connections(self):
        with self._lock:
            return len(self._streams)

    def _stream_count(self):
        return len(self._streams)

    def push(self, obj):
        """Deliver a receive object {"envelope":..., "account":...} to every open SSE stream; with no
        stream it is held (receive_mode on-connection) or dropped (on-start). Returns True if queued.
        From a sender in `untrusted_senders` only the exception object goes out; the message is held
        until `trust` (then delivered again)."""
        self.given.append(obj)
        env = obj.get("envelope") if isinstance(obj, dict) else None
        sender = isinstance(env, dict) and (env.get("sourceNumber") or env.get("sourceUuid"))
        if isinstance(sender, str) and sender in self.untrusted_senders:
            # decryption fails: JsonReceiveMessageHandler writes the envelope without content plus the
            # exception, and ReceiveHelper keeps the message to retry after trust (retryFailedReceivedMessages)
            with self._cond:
                self.held.append(obj)
            bare = {k: v for k, v in env.items() if k in ("source", "sourceNumber", "sourceUuid", "sourceName",
                                                           "sourceDevice", "timestamp", "serverReceivedTimestamp",
                                                           "serverDeliveredTimestamp")}
            obj = {"envelope": bare, "account": obj.get("account", self.number),
                   "exception": {"message": "Untrusted identity: " + sender, "type": "UntrustedIdentityException"}}
        with self._cond:
            if self._streams:
                for st in self._streams:
                    st.queue.append(obj)
                queued = True
            elif self.receive_mode == "on-connection":
                self.pending.append(obj)
                queued = True
            else:
                self.dropped += 1
                queued = False
            self._bump()
        return queued

    def push_envelope(self, envelope):
        return self.push({"envelope": envelope, "account": self.number})

    def cut_mid_event(self, obj=None, timeout=2.0):
        """Write half of an SSE event to every open stream, then close the TCP connection (no
        terminating chunk). Waits (bounded) until those streams are gone; returns how many were cut."""
        if obj is None:
            obj = {"envelope": {"source": "+15550000002", "sourceNumber": "+15550000002",
                                "timestamp": _fake_now_ms(), "dataMessage": {"message": "cut"}},
                   "account": self.number}
        with self._cond:
            streams = list(self._streams)
            for st in streams:
                st.cut = obj
            self._bump()
        self.wait_for(lambda f: not any(s in f._streams for s in streams), timeout)
        return len(streams)

    def close_streams(self, timeout=2.0):
        """End every open SSE stream cleanly (terminating chunk, then close)."""
        with self._cond:
            streams = list(self._streams)
            for st in streams:
                st.close = True
            self._bump()
        self.wait_for(lambda f: not any(s in f._streams for s in streams), timeout)
        return len(streams)

    def add_group(self, name, members=(), group_id=None, **extra):
        """Register a group; returns its signal-cli id (base64 of 32 bytes)."""
        gid = group_id or base64.b64encode(os.urandom(32)).decode()
        members = list(members)
        if self.number not in members:
            members.insert(0, self.number)
        with self._lock:
            self.groups[gid] = dict({"name": name, "description": "", "members": members}, **extra)
        return gid

    def _conn_opened(self, h):
        with self._lock:
            self.connections_opened += 1
        super()._conn_opened(h)

    def requests(self, method=None):
        """Per-JSON-RPC-request records {"method","params","id","attachments","result","error",...}."""
        with self._lock:
            return [r for r in self.rpc if method is None or r["method"] == method]

    def sent(self, method="send"):
        """params of successful calls of `method` (default "send")."""
        with self._lock:
            return [r["params"] for r in self.rpc if r["method"] == method and r["error"] is None]

    def texts(self):
        """The texts of successful sends, oldest first (Harness.texts() for a fake with no harness around it)."""
        return [p.get("message") for p in self.sent("send")]

    def clear(self):
        with self._cond:
            del self.calls[:]
            del self.rpc[:]
            del self.delivered[:]
            del self.delivered_on[:]
            self._bump()

    # -- HTTP -----------------------------------------------------------------------------------
    def _handle(self, h):
        call = self._begin(h)
        if not self._fault_gate(h, call, self.mode):
            return
        path, m = call["path"], call["method"]
        if self.mode == "http500":
            if path == "/api/v1/rpc":
                return self._send_json(h, call, 500, self._rpc_err(-32603, "An internal server error has occurred.",
                                                                   None, None), ctype="application/json")
            return self._send_raw(h, call, 500)
        if path == "/api/v1/check":
            return self._send_raw(h, call, 200 if m == "GET" else 405)
        if path not in ("/api/v1/rpc", "/api/v1/events"):
            return self._send_raw(h, call, 404)
        if not self._host_ok(call):
            return self._send_raw(h, call, 421)
        if path == "/api/v1/rpc":
            if m != "POST":
                return self._send_raw(h, call, 405)
            ctype = call["headers"].get("content-type")
            if not ctype or not ctype.startswith("application/json"):
                return self._send_raw(h, call, 415)
            return self._rpc_http(h, call)
        if m != "GET":
            return self._send_raw(h, call, 405)
        acct = call["query"].get("account")
        if acct and acct not in ((self.accounts or []) + [self.number, self.uuid]):
            return self._send_raw(h, call, 400)      # unknown account: 400, no body (HttpServerHandler.java)
        return self._sse(h, call, acct or None)

    def _host_ok(self, call):
        # isHostAllowed (HttpServerHandler.java, 0.14.4/0.14.5): the bind host, localhost, 127.0.0.1 or ::1,
        # with the bind port when the header names a port; any-address binds skip the check
        if self.bind_host in ("0.0.0.0", "::"):
            return True
        header = call["headers"].get("host") or ""
        host, port = header, None
        if header.startswith("["):
            end = header.find("]")
            if end < 0:
                return False
            host, rest = header[1:end], header[end + 1:]
            port = rest[1:] if rest.startswith(":") else None
        elif ":" in header and header.rsplit(":", 1)[1].isdigit():
            host, port = header.rsplit(":", 1)
        if not header or host.lower() not in (self.bind_host.lower(), "localhost", "127.0.0.1", "::1"):
            return False
        return port is None or (port.isdigit() and int(port) == (self.bound_port or self._port))

    @staticmethod
    def _rpc_err(code, message, data, rid):
        return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}, "id": rid}

    def _rpc_http(self, h, call):
        if call.get("json_error") is not None or not call["body"]:
            return self._send_json(h, call, 200, self._rpc_err(-32700, "Parse error", None, None),
                                   ctype="application/json")
        req = call["json"]
        if _fake_longest_string(req) > _FAKE_JACKSON_MAX_STRING:
            # Jackson's reader throws on a string over 20,000,000 chars; HttpServerHandler's catch-all answers
            # 200 with an id-less internal error (JsonRpcReader.java, HttpServerHandler.java, libs.versions.toml)
            with self._cond:
                self.rpc.append({"method": req.get("method") if isinstance(req, dict) else None, "params": None,
                                 "id": None, "attachments": [], "result": None, "time": time.time(),
                                 "error": {"code": -32603, "message": "An internal server error has occurred."}})
                self._bump()
            return self._send_json(h, call, 200, {"jsonrpc": "2.0", "error": {
                "code": -32603, "message": "An internal server error has occurred."}, "id": None},
                ctype="application/json")
        if isinstance(req, list):
            if not req:
                return self._send_json(h, call, 200, self._rpc_err(-32600, "Invalid request", None, None),
                                       ctype="application/json")
            responses = [r for r in (self._rpc_one(o) for o in req) if r is not None]
            if not responses:
                return self._send_raw(h, call, 201)
            return self._send_json(h, call, 200, responses, ctype="application/json")
        resp = self._rpc_one(req)
        if resp is None:
            return self._send_raw(h, call, 201)
        return self._send_json(h, call, 200, resp, ctype="application/json")

    def _rpc_one(self, obj):
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0" or not isinstance(obj.get("method"), str):
            rid = obj.get("id") if isinstance(obj, dict) else None
            return self._rpc_err(-32600, "Invalid request", None, rid)
        rid = obj.get("id")
        notification = rid is None
        method = obj["method"]
        params = obj.get("params")
        if params is None:
            params = {}
        rec = {"method": method, "params": params, "id": rid, "attachments": [], "result": None,
               "error": None, "time": time.time()}
        try:
            if not isinstance(params, dict):
                raise _FakeRpcError(-32602, "Invalid params: params must be an object")
            if self.accounts is not None:
                # multi-account mode: getManagerFromParams takes "account" out of the params; without it only a
                # daemon with a single account knows which one, except for multi-account commands such as
                # version (SignalJsonRpcCommandHandler.java)
                acct = params.pop("account", None)
                if acct is not None and acct not in self.accounts:
                    raise _FakeRpcError(-32602, "Specified account does not exist")
                if acct is None and len(self.accounts) != 1 and method != "version":
                    raise _FakeRpcError(-32602, "Method requires valid account parameter")
            scripted = self._pop_scripted(self.errors, self._lock,
                                          lambda e: len(e) < 3 or e[2] is None or e[2] == method)
            if scripted is not None:
                code, message = scripted[0], scripted[1]
                data = scripted[3] if len(scripted) >= 4 else self._scripted_data(code, method, params)
                raise _FakeRpcError(code, message, data)
            handler = self._methods.get(method)
            if handler is None:
                raise _FakeRpcError(-32601, "Method not implemented")
            rec["result"] = handler(params, rec)
        except _FakeRpcError as e:
            rec["error"] = {"code": e.code, "message": e.message, "data": e.data}
        with self._cond:
            self.rpc.append(rec)
            self._bump()
        if notification:
            return None
        if rec["error"] is not None:
            return {"jsonrpc": "2.0", "error": rec["error"], "id": rid}
        return {"jsonrpc": "2.0", "result": rec["result"], "id": rid}

    def _scripted_data(self, code, method, params):
        if code not in (-4, -5) or method not in _FAKE_SEND_TYPE_METHODS:
            return None
        kind = "IDENTITY_FAILURE" if code == -4 else "RATE_LIMIT_FAILURE"
        results = [self._result(r, kind) for r in self._plist(params, "recipient", "recipients")]
        return {"response": {"timestamp": self._next_ts(), "results": results}}

    # -- param access (dashed or camelCase, singular or plural) -----------------------------------
    @staticmethod
    def _camel(name):
        head, *rest = name.split("-")
        return head + "".join(w[:1].upper() + w[1:] for w in rest)

    def _p(self, params, name):
        for k in (name, self._camel(name)):
            if k in params and params[k] is not None:
                return params[k]
        return None

    def _plist(self, params, singular, plural):
        out = []
        for name in (singular, plural):
            v = self._p(params, name)
            if v is None:
                continue
            out.extend(v if isinstance(v, list) else [v])
        return out

    def _num(self, params, name):
        v = self._p(params, name)
        if v is None:
            return None
        if not _fake_is_int(v):
            raise _FakeRpcError(-32603, _fake_java_cast_error(v))
        return v

    def _next_ts(self):
        with self._lock:
            ts = max(_fake_now_ms(), self._last_ts + 1)
            self._last_ts = ts
            return ts

    def _uuid_for(self, number):
        u = self.uuids.get(number)
        if u is None:
            u = str(uuid.uuid5(uuid.NAMESPACE_URL, "signal:" + number))
        return u

    def _address(self, recipient):
        if recipient.startswith("u:"):
            return {"uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, "signal:" + recipient)), "number": None,
                    "username": recipient[2:]}
        if recipient.startswith("PNI:"):
            return {"uuid": recipient, "number": None, "username": None}
        if _FAKE_UUID_RE.match(recipient):
            number = next((n for n, u in self.uuids.items() if u == recipient), None)
            return {"uuid": recipient, "number": number, "username": None}
        return {"uuid": self._uuid_for(recipient), "number": recipient, "username": None}

    def _result(self, recipient, kind=None, group_id=None):
        kind = kind or self.recipient_results.get(recipient) or \
            (self.recipient_results.get(group_id) if group_id else None) or "SUCCESS"
        res = {"recipientAddress": self._address(recipient)}
        if group_id is not None:
            res["groupId"] = group_id
        res["type"] = kind
        if kind == "RATE_LIMIT_FAILURE":
            # token only when Signal wants a captcha (proofRequiredFailure); retryAfterSeconds when it says
            # (JsonSendMessageResult.java)
            if self.captcha_token:
                res["token"] = self.captcha_token
            if self.retry_after_seconds is not None:
                res["retryAfterSeconds"] = self.retry_after_seconds
        return res

    def _check_recipient(self, r):
        if not isinstance(r, str) or not r:
            raise _FakeRpcError(-32602, "Invalid params: recipient must be a string")
        if r.startswith(("u:", "PNI:")) or _FAKE_UUID_RE.match(r):
            return
        if not re.match(r"^\+[1-9][0-9]{5,17}$", r):
            raise _FakeRpcError(-1, "Invalid phone number '%s'" % r)

    def _targets(self, params, allow_username=True):
        recips = self._plist(params, "recipient", "recipients")
        groups = self._plist(params, "group-id", "group-ids")
        users = self._plist(params, "username", "usernames") if allow_username else []
        if self._p(params, "note-to-self"):
            recips.append(self.number)
        if not (recips or groups or users):
            raise _FakeRpcError(-1, "No recipients given")
        for r in recips:
            self._check_recipient(r)
        for g in groups:
            try:
                raw = base64.b64decode(g, validate=True) if isinstance(g, str) else b""
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise _FakeRpcError(-1, "Invalid group id: %s" % g)
            if g not in self.groups:
                raise _FakeRpcError(-1, "Group not found: %s" % g)
        return recips, groups, users

    def _send_results(self, recips, groups, users, ts):
        results = [self._result(r) for r in recips]
        for g in groups:
            for member in self.groups[g].get("members", []):
                if member not in (self.number, self.uuid):
                    results.append(self._result(member, group_id=g))
        for u in users:
            results.append(self._result("u:" + u))
        if results and all(r["type"] != "SUCCESS" for r in results):
            types = {r["type"] for r in results}
            data = {"response": {"timestamp": ts, "results": results}}
            if types == {"IDENTITY_FAILURE"}:
                raise _FakeRpcError(-4, "Failed to send message due to untrusted identities", data)
            if types == {"RATE_LIMIT_FAILURE"}:
                raise _FakeRpcError(-5, "Failed to send message due to rate limiting", data)
            raise _FakeRpcError(-1, "Failed to send message", data)
        return {"timestamp": ts, "results": results}

    def _decode_attachment(self, arg):
        if not isinstance(arg, str):
            raise _FakeRpcError(-32602, "Invalid params: attachment must be a string")
        m = _FAKE_DATA_URI_RE.match(arg)
        params = {}
        if m and m.group("parameters"):
            # one greedy key=value over all parameters, then URLDecoder.decode; a bad escape throws
            # IllegalArgumentException and Utils.createStreamDetails reads the whole string as a file path
            # (DataURI.java, Utils.java)
            pm = _FAKE_DATA_URI_PARAM_RE.match(m.group("parameters"))
            try:
                if pm:
                    params[pm.group("key")] = _fake_java_url_decode(pm.group("value"))
            except ValueError:
                m = None
        if m:
            raw = m.group("data")
            try:
                if m.group("base64"):
                    data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
                else:
                    data = urllib.parse.unquote_to_bytes(raw)
            except (binascii.Error, ValueError) as e:
                raise _FakeRpcError(-32603, "Failed to send message: %s (AttachmentInvalidException)" % e)
            return {"mime": m.group("type") or "text/plain", "filename": params.get("filename"), "data": data}
        if os.path.isfile(arg):
            with open(arg, "rb") as fh:
                data = fh.read()
            return {"mime": mimetypes.guess_type(arg)[0] or "application/octet-stream",
                    "filename": os.path.basename(arg), "data": data, "path": arg}
        raise _FakeRpcError(-32603, "Failed to send message: %s (No such file or directory) "
                                    "(AttachmentInvalidException)" % arg)

    # -- methods --------------------------------------------------------------------------------
    def _m_send(self, p, rec):
        recips, groups, users = self._targets(p)
        sticker = self._p(p, "sticker")
        message = self._p(p, "message")
        if message is None:
            message = ""
        if not isinstance(message, str):
            raise _FakeRpcError(-32602, "Invalid params: message must be a string")
        raw_atts = self._plist(p, "attachment", "attachments")
        for name in ("mention", "text-style", "quote-mention", "quote-text-style"):
            plural = name + "s"
            for v in self._plist(p, name, plural):
                if not isinstance(v, str) or not re.match(r"^(\d+):(\d+):(.+)$", v):
                    what = "mention" if "mention" in name else "textStyle"
                    expect = "start:length:recipientNumber" if what == "mention" else "start:length:STYLE"
                    raise _FakeRpcError(-1, "Invalid %s syntax (%s) expected '%s'" % (what, v, expect))
        quote = None
        qts = self._num(p, "quote-timestamp")
        if qts is not None:
            author = self._p(p, "quote-author")
            if author is None:
                raise _FakeRpcError(-1, "Quote author parameter is missing")
            quote = {"timestamp": qts, "author": author, "message": self._p(p, "quote-message") or ""}
        self._num(p, "story-timestamp")
        if message == "" and not raw_atts and sticker is None and quote is None:
            raise _FakeRpcError(-1, "Sending empty message is not allowed, either a message, "
                                    "attachment or sticker must be given.")
        edit_ts = self._num(p, "edit-timestamp")
        atts = [self._decode_attachment(a) for a in raw_atts]
        rec["attachments"] = atts
        ts = self._next_ts()
        result = self._send_results(recips, groups, users, ts)
        rec.update({"timestamp": ts, "recipients": recips, "group_ids": groups, "message": message,
                    "quote": quote, "edit_timestamp": edit_ts})
        return result

    def _m_send_reaction(self, p, rec):
        recips, groups, users = self._targets(p)
        emoji = self._p(p, "emoji")
        if not isinstance(emoji, str) or not emoji:
            raise _FakeRpcError(-1, "Emoji parameter is missing")
        author = self._p(p, "target-author")
        if not isinstance(author, str) or not author:
            raise _FakeRpcError(-1, "Target author parameter is missing")
        target = self._num(p, "target-timestamp")
        if target is None:
            raise _FakeRpcError(-1, "Target timestamp parameter is missing")
        ts = self._next_ts()
        rec.update({"timestamp": ts, "emoji": emoji, "remove": bool(self._p(p, "remove")),
                    "target_author": author, "target_timestamp": target})
        return self._send_results(recips, groups, users, ts)

    def _m_remote_delete(self, p, rec):
        recips, groups, users = self._targets(p)
        target = self._num(p, "target-timestamp")
        if target is None:
            raise _FakeRpcError(-1, "Target timestamp parameter is missing")
        ts = self._next_ts()
        rec.update({"timestamp": ts, "target_timestamp": target})
        return self._send_results(recips, groups, users, ts)

    def _m_send_typing(self, p, rec):
        recips, groups, _users = self._targets(p, allow_username=False)
        ts = self._next_ts()
        rec.update({"timestamp": ts, "stop": bool(self._p(p, "stop"))})
        return self._send_results(recips, groups, [], ts)

    def _m_send_receipt(self, p, rec):
        recips = self._plist(p, "recipient", "recipients")
        if len(recips) != 1:
            raise _FakeRpcError(-1, "No recipients given" if not recips else "Only one recipient is allowed")
        self._check_recipient(recips[0])
        targets = self._p(p, "target-timestamp")
        targets = targets if isinstance(targets, list) else ([] if targets is None else [targets])
        if not targets:
            raise _FakeRpcError(-1, "Target timestamp parameter is missing")
        for t in targets:
            if not _fake_is_int(t):
                raise _FakeRpcError(-32603, _fake_java_cast_error(t))
        kind = self._p(p, "type") or "read"
        if kind not in ("read", "viewed"):
            raise _FakeRpcError(-1, "Unknown receipt type: %s" % kind)
        ts = self._next_ts()
        rec.update({"timestamp": ts, "receipt_type": kind, "target_timestamps": targets})
        return self._send_results(recips, [], [], ts)

    def _m_get_attachment(self, p, rec):
        aid = self._p(p, "id")
        with self._lock:
            data = self.attachments.get(aid) if isinstance(aid, str) else None
        if data is None:
            raise _FakeRpcError(-1, "Could not find attachment with ID: %s" % aid)
        return {"data": base64.b64encode(bytes(data)).decode("ascii")}

    def _contact_obj(self, number, entry):
        obj = {"number": number, "uuid": self._uuid_for(number), "username": None, "name": None,
               "givenName": None, "familyName": None, "nickName": None, "nickGivenName": None,
               "nickFamilyName": None, "note": None, "color": None, "isArchived": False, "isBlocked": False,
               "isHidden": False, "messageExpirationTime": 0, "profileSharing": False, "unregistered": False,
               "profile": {"lastUpdateTimestamp": 0, "givenName": None, "familyName": None, "about": None,
                           "aboutEmoji": None, "hasAvatar": False, "mobileCoinAddress": None}}
        if isinstance(entry, dict):
            obj.update(entry)
        elif entry is not None:
            obj["name"] = entry
            obj["givenName"] = entry
        return obj

    def _m_list_contacts(self, p, rec):
        wanted = self._plist(p, "recipient", "recipients")
        with self._lock:
            items = list(self.contacts.items())
        return [self._contact_obj(n, e) for n, e in items if not wanted or n in wanted]

    def _group_obj(self, gid, g):
        members = [{"number": m if m.startswith("+") else None,
                    "uuid": m if _FAKE_UUID_RE.match(m) else self._uuid_for(m)} for m in g.get("members", [])]
        return {"id": gid, "name": g.get("name"), "description": g.get("description", ""),
                "isMember": True, "isBlocked": False, "messageExpirationTime": 0, "members": members,
                "pendingMembers": [], "requestingMembers": [],
                "admins": [{"number": self.number, "uuid": self.uuid}], "banned": [],
                "permissionAddMember": "EVERY_MEMBER", "permissionEditDetails": "EVERY_MEMBER",
                "permissionSendMessage": "EVERY_MEMBER", "groupInviteLink": None}

    def _m_list_groups(self, p, rec):
        wanted = self._plist(p, "group-id", "group-ids")
        with self._lock:
            items = list(self.groups.items())
        return [self._group_obj(gid, g) for gid, g in items if not wanted or gid in wanted]

    def _m_update_group(self, p, rec):
        gid = self._p(p, "group-id")
        members = self._plist(p, "member", "members")
        for mbr in members:
            self._check_recipient(mbr)
        ts = self._next_ts()
        if gid is None:
            gid = self.add_group(self._p(p, "name") or "", members, description=self._p(p, "description") or "")
            rec.update({"timestamp": ts, "group_id": gid, "created": True})
            return {"groupId": gid, "timestamp": ts}
        with self._lock:
            g = self.groups.get(gid)
            if g is None:
                raise _FakeRpcError(-1, "Group not found: %s" % gid)
            if self._p(p, "name") is not None:
                g["name"] = self._p(p, "name")
            if self._p(p, "description") is not None:
                g["description"] = self._p(p, "description")
            for mbr in members:
                if mbr not in g["members"]:
                    g["members"].append(mbr)
            for mbr in self._plist(p, "remove-member", "remove-members"):
                if mbr in g["members"]:
                    g["members"].remove(mbr)
        rec.update({"timestamp": ts, "group_id": gid, "created": False})
        return self._send_results([], [gid], [], ts)

    def _m_version(self, p, rec):
        return {"version": self.VERSION}

    def _m_trust(self, p, rec):
        recips = self._plist(p, "recipient", "recipients")
        if not recips:
            raise _FakeRpcError(-1, "No recipients given")
        if not self._p(p, "trust-all-known-keys") and not self._p(p, "verified-safety-number"):
            raise _FakeRpcError(-1, "You need to specify the fingerprint/safety number you have verified "
                                    "with -v SAFETY_NUMBER")
        with self._lock:
            self.trusted.extend(recips)
            again = [o for o in self.held if {o["envelope"].get("sourceNumber"), o["envelope"].get("sourceUuid")}
                     & set(recips)]
            self.held = [o for o in self.held if o not in again]
            for r in recips:
                self.untrusted_senders.discard(r)
        for o in again:          # trusting sets needsToRetryFailedMessages: the held messages come again
            self.push(o)
        return {}

    def _m_list_identities(self, p, rec):
        # src/main/java/org/asamk/signal/commands/ListIdentitiesCommand.java (JsonIdentity)
        number = self._p(p, "number")
        with self._lock:
            known = sorted(self.identities.items())
        return [{"number": n, "uuid": self._uuid_for(n), "fingerprint": "05" + "ab" * 32,
                 "safetyNumber": "12345 67890 " * 6, "scannableSafetyNumber": None, "trustLevel": level,
                 "addedTimestamp": 1767225600000} for n, level in known if number in (None, n)]

    def _m_get_user_status(self, p, rec):
        # src/main/java/org/asamk/signal/commands/GetUserStatusCommand.java (JsonUserStatus)
        out = []
        for r in self._plist(p, "recipient", "recipients"):
            known = r not in self.unregistered
            out.append({"recipient": r, "number": r if known else None, "uuid": self._uuid_for(r) if known else None,
                        "isRegistered": known})
        return out

    def _m_receive(self, p, rec):
        if "account" in p:
            raise _FakeRpcError(-32600, 'Unrecognized field "account"')
        if self._streams:
            raise _FakeRpcError(-1, "Receive command cannot be used if messages are already being received.")
        timeout = p.get("timeout", 3.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise _FakeRpcError(-32600, "timeout must be a number")
        max_messages = p.get("maxMessages", p.get("max-messages"))
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._cond:
            while not self.pending and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            out = []
            while self.pending and (not max_messages or len(out) < max_messages):
                out.append(self.pending.popleft())
            self.delivered.extend(out)
            self._bump()
        return out

    # -- SSE ------------------------------------------------------------------------------------
    def _sse(self, h, call, account=None):
        st = _FakeSseStream(h)
        with self._cond:
            call["status"] = 200
            call["response"] = "stream"
        h._fake_responded = True
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.flush()

        def write(data):
            h.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

        with self._cond:
            st.queue.extend(self.pending)
            self.pending.clear()
            self._streams.append(st)
            self.sse_streams += 1
            serial = self.sse_streams
            self._bump()
        try:
            last_ka = time.monotonic()
            while True:
                with self._cond:
                    while not (st.queue or st.cut is not None or st.close or self._stopping.is_set()):
                        now = time.monotonic()
                        next_ka = last_ka + float(self.keepalive_seconds)  # re-read: tests may change it
                        if now >= next_ka:
                            break
                        self._cond.wait(min(next_ka - now, 0.2))
                        if self._peer_gone(h.connection):
                            st.gone = True
                            break
                    items = list(st.queue)
                    st.queue.clear()
                if st.gone or self._stopping.is_set():
                    break
                if st.cut is not None:
                    event = b"event:receive\ndata:" + _fake_dumps(st.cut) + b"\n\n"
                    write(event[:max(1, len(event) // 2)])
                    _fake_shutdown_sock(h.connection)
                    break
                for obj in items:
                    if account and isinstance(obj, dict) and obj.get("account") not in (None, account):
                        continue          # ?account= streams only that account; without it, all of them
                    write(b"event:receive\ndata:" + _fake_dumps(obj) + b"\n\n")
                    with self._cond:
                        self.delivered.append(obj)
                        self.delivered_on.append(serial)
                        self._bump()
                if st.close:
                    h.wfile.write(b"0\r\n\r\n")
                    break
                if time.monotonic() >= last_ka + float(self.keepalive_seconds):
                    write(b":\n")
                    last_ka = time.monotonic()
        except OSError:
            pass
        finally:
            with self._cond:
                if st in self._streams:
                    self._streams.remove(st)
                self._bump()
            _fake_shutdown_sock(h.connection)

    @staticmethod
    def _peer_gone(sock):
        try:
            r, _, _ = select.select([sock], [], [], 0)
            if r:
                return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False


# ----------------------------------------------------------------------------------------------
# signal-cli-rest-api
# ----------------------------------------------------------------------------------------------

_FAKE_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _fake_ws_frame(opcode, payload=b"", fin=True):
    """Unmasked (server-to-client) WebSocket frame."""
    payload = bytes(payload)
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        hdr = struct.pack("!BB", b0, n)
    elif n < 65536:
        hdr = struct.pack("!BBH", b0, 126, n)
    else:
        hdr = struct.pack("!BBQ", b0, 127, n)
    return hdr + payload


def _fake_ws_read(rfile, limit):
    """Read one frame: (fin, opcode, masked, payload) | None on EOF | ("too_big", n)."""
    hdr = rfile.read(2)
    if len(hdr) < 2:
        return None
    b0, b1 = hdr[0], hdr[1]
    n = b1 & 0x7F
    if n == 126:
        ext = rfile.read(2)
        if len(ext) < 2:
            return None
        n = struct.unpack("!H", ext)[0]
    elif n == 127:
        ext = rfile.read(8)
        if len(ext) < 8:
            return None
        n = struct.unpack("!Q", ext)[0]
    if n > limit:
        return ("too_big", n)
    masked = bool(b1 & 0x80)
    key = rfile.read(4) if masked else b""
    payload = rfile.read(n) if n else b""
    if len(payload) < n or (masked and len(key) < 4):
        return None
    if masked:
        payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
    return bool(b0 & 0x80), b0 & 0x0F, masked, payload


class _FakeWs:
    def __init__(self, h):
        self.h = h
        self.sock = h.connection
        self.queue = collections.deque()
        self.wlock = threading.Lock()
        self.abort = False
        self.close_req = None
        self.peer_closed = False
        self.close_sent = False

    def send(self, opcode, payload=b""):
        with self.wlock:
            self.sock.sendall(_fake_ws_frame(opcode, payload))

    def send_close(self, code, reason=""):
        with self.wlock:
            if self.close_sent:
                return
            self.close_sent = True
            self.sock.sendall(_fake_ws_frame(0x8, struct.pack("!H", code) + reason.encode("utf-8")))


class FakeSignalRest(_FakeBase):
    """Fake bbernhard/signal-cli-rest-api. Public attributes:

    number, mode ("normal"|"native"|"json-rpc"|"json-rpc-native"), send_shape ("object"|"array"),
    fault ("ok"|"down"|"slow"|"http500"), slow_seconds, version, errors (deque of
    (status, body[, path_prefix]); 2-tuples hit the next non-GET request), attachments {id: bytes},
    groups {internal_id: {...}}, recipient_failures {recipient: reason}, pending (normal-mode queue),
    dropped (json-rpc pushes with no socket), delivered, ping_seconds,
    read_limit (client frame limit, 512 like gorilla), ws_received (client text frames),
    pongs, ws_close_codes, trusted, receive_max_wait (cap on the long-poll wait),
    identities {number: status} (GET /v1/identities/{number}).
    """

    _server_header = "signal-cli-rest-api-fake"

    def __init__(self, number="+15550000001", mode="normal", send_shape="object"):
        super().__init__()
        self.number = number
        self.mode = mode
        self.send_shape = send_shape
        self.fault = "ok"
        self.slow_seconds = 2.0
        self.version = "0.100"
        self.errors = collections.deque()
        self.attachments = {}
        self.groups = {}
        self.recipient_failures = {}
        self.pending = collections.deque()
        self.dropped = 0
        self.delivered = []
        self.ping_seconds = 54.0
        self.read_limit = 512
        self.ws_received = []
        self.pongs = 0
        self.ws_close_codes = []
        self.trusted = []
        self.receive_max_wait = 5.0
        self.identities = {}
        self._ws = []
        self._last_ts = 0

    # -- public helpers -------------------------------------------------------------------------
    @property
    def ws_connections(self):
        with self._lock:
            return len(self._ws)

    def _stream_count(self):
        return len(self._ws)

    @staticmethod
    def rest_group_id(internal_id):
        """signal-cli group id (base64) -> REST id "group." + base64(id string)."""
        return "group." + base64.b64encode(internal_id.encode("ascii")).decode("ascii")

    @staticmethod
    def internal_group_id(rest_id):
        """REST id "group.…" -> signal-cli group id; raises ValueError when malformed."""
        if not rest_id.startswith("group."):
            raise ValueError("not a REST group id")
        internal = base64.b64decode(rest_id[6:], validate=True).decode("ascii")
        if len(base64.b64decode(internal, validate=True)) != 32:
            raise ValueError("group id must decode to 32 bytes")
        return internal

    def add_group(self, name, members=(), internal_id=None, **extra):
        """Register a group; returns its REST id ("group.…")."""
        internal = internal_id or base64.b64encode(os.urandom(32)).decode("ascii")
        with self._lock:
            self.groups[internal] = dict({"name": name, "description": "", "members": list(members)}, **extra)
        return self.rest_group_id(internal)

    def push(self, obj):
        """normal/native: queue for the next GET /v1/receive. json-rpc: send as a text frame to every
        connected WebSocket whose account matches; with no socket connected the message is DROPPED
        (counted in `dropped`). Returns True if queued/sent."""
        self.given.append(obj)
        with self._cond:
            if not self.mode.startswith("json-rpc"):
                self.pending.append(obj)
                self._bump()
                return True
            acct = obj.get("account") if isinstance(obj, dict) else None
            if acct is not None and acct != self.number:
                return False
            if not self._ws:
                self.dropped += 1
                self._bump()
                return False
            for wsock in self._ws:
                wsock.queue.append(obj)
            self._bump()
            return True

    def push_envelope(self, envelope):
        return self.push({"envelope": envelope, "account": self.number})

    def close_ws_abruptly(self, timeout=2.0):
        """Close every WebSocket's TCP connection without a close frame; returns how many."""
        return self._end_ws(lambda wsock: setattr(wsock, "abort", True), timeout)

    def close_ws(self, code=1000, reason="", timeout=2.0):
        """Send a close frame to every WebSocket and end it; returns how many."""
        return self._end_ws(lambda wsock: setattr(wsock, "close_req", (code, reason)), timeout)

    def _end_ws(self, mark, timeout):
        with self._cond:
            conns = list(self._ws)
            for wsock in conns:
                mark(wsock)
            self._bump()
        self.wait_for(lambda f: not any(w in f._ws for w in conns), timeout)
        return len(conns)

    def sent(self):
        """JSON bodies of successful POST /v2/send calls."""
        with self._lock:
            return [c["json"] for c in self.calls if c["path"] == "/v2/send" and c["method"] == "POST"
                    and _fake_is_int(c.get("status")) and 200 <= c["status"] < 300]

    def clear(self):
        with self._cond:
            del self.calls[:]
            del self.delivered[:]
            del self.ws_received[:]
            self._bump()

    def _next_ts(self):
        with self._lock:
            ts = max(_fake_now_ms(), self._last_ts + 1)
            self._last_ts = ts
            return ts

    # -- HTTP -----------------------------------------------------------------------------------
    def _err(self, h, call, status, message):
        return self._send_json(h, call, status, {"error": message})

    def _handle(self, h):
        call = self._begin(h)
        if not self._fault_gate(h, call, self.fault):
            return
        m, path = call["method"], call["path"]
        segs = [urllib.parse.unquote(s) for s in path.split("/")[1:]]
        if self.fault == "http500":
            return self._err(h, call, 500, "Internal Server Error")
        if path not in ("/v1/about", "/v1/health"):
            scripted = self._pop_scripted(
                self.errors, self._lock,
                lambda e: path.startswith(e[2]) if len(e) >= 3 and e[2] else m != "GET")
            if scripted is not None:
                status, body = scripted[0], scripted[1]
                if isinstance(body, (bytes, bytearray)):
                    return self._send_raw(h, call, status, body, ctype="text/plain; charset=utf-8")
                if isinstance(body, str):
                    body = {"error": body}
                return self._send_json(h, call, status, body)

        if m == "GET" and path == "/v1/about":
            return self._send_json(h, call, 200, {
                "versions": ["v1", "v2"], "build": 2,
                "mode": "json-rpc" if self.mode.startswith("json-rpc") else self.mode,
                "version": self.version, "capabilities": {"v2/send": ["quotes", "mentions"]}})
        if m == "GET" and path == "/v1/health":
            return self._send_raw(h, call, 204)
        if m == "GET" and path == "/v1/accounts":
            return self._send_json(h, call, 200, [self.number])
        if m == "POST" and path == "/v2/send":
            return self._v2_send(h, call)
        if len(segs) == 2 and segs[:2] == ["v1", "attachments"] and m == "GET":
            with self._lock:
                ids = list(self.attachments)
            return self._send_json(h, call, 200, ids)
        if len(segs) == 3 and segs[:2] == ["v1", "attachments"] and m in ("GET", "DELETE"):
            return self._attachment(h, call, segs[2])

        if len(segs) >= 3 and segs[0] == "v1":
            number = segs[2]
            route = segs[1]
            known = route in ("reactions", "remote-delete", "typing-indicator", "receipts", "identities",
                              "groups", "receive")
            if known and number != self.number:
                return self._err(h, call, 400, "User %s is not registered." % number)
            if route == "reactions" and len(segs) == 3 and m in ("POST", "DELETE"):
                return self._reaction(h, call)
            if route == "remote-delete" and len(segs) == 3 and m == "DELETE":
                return self._remote_delete(h, call)
            if route == "typing-indicator" and len(segs) == 3 and m in ("PUT", "DELETE"):
                return self._simple(h, call, ("recipient",))
            if route == "receipts" and len(segs) == 3 and m == "POST":
                return self._receipt(h, call)
            if route == "identities" and len(segs) == 5 and segs[3] == "trust" and m == "PUT":
                return self._trust(h, call, segs[4])
            if route == "identities" and len(segs) == 3 and m == "GET":
                # src/api/api.go ListIdentities -> []client.IdentityEntry (src/client/client.go)
                with self._lock:
                    known = sorted(self.identities.items())
                return self._send_json(h, call, 200, [
                    {"number": n, "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, "signal:" + n)), "status": status,
                     "fingerprint": "05 ab " * 16, "safety_number": "12345 " * 12, "added": "2026-01-01 00:00:00 UTC"}
                    for n, status in known])
            if route == "groups" and len(segs) == 3 and m in ("GET", "POST"):
                return self._groups(h, call)
            if route == "groups" and len(segs) == 4 and m == "GET":
                return self._group(h, call, segs[3])
            if route == "groups" and len(segs) == 4 and m == "PUT":
                return self._group_update(h, call, segs[3])
            if route == "receive" and len(segs) == 3 and m == "GET":
                if self.mode.startswith("json-rpc"):
                    return self._ws_upgrade(h, call)
                return self._receive_poll(h, call)
        return self._send_raw(h, call, 404, b"404 page not found", ctype="text/plain")

    def _body(self, h, call, types):
        """Validate the JSON body like gin's binding; returns dict or None (answered 400)."""
        b = call["json"]
        if call.get("json_error") is not None or not isinstance(b, dict):
            self._err(h, call, 400, "Couldn't process request - invalid request")
            return None
        for key, kind in types.items():
            v = b.get(key)
            if v is None:
                continue
            ok = {"int": _fake_is_int(v), "str": isinstance(v, str), "bool": isinstance(v, bool),
                  "strlist": isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "list": isinstance(v, list), "dict": isinstance(v, dict)}[kind]
            if not ok:
                self._err(h, call, 400, "Couldn't process request - invalid request")
                return None
        return b

    def _v2_send(self, h, call):
        b = self._body(h, call, {"number": "str", "recipients": "strlist", "recipient": "str", "message": "str",
                                 "base64_attachments": "strlist", "quote_timestamp": "int", "quote_author": "str",
                                 "quote_message": "str", "quote_mentions": "list", "mentions": "list",
                                 "text_mode": "str", "edit_timestamp": "int", "notify_self": "bool",
                                 "link_preview": "dict", "view_once": "bool", "sticker": "str"})
        if b is None:
            return
        if not b.get("number"):
            return self._err(h, call, 400, "Couldn't process request - number missing")
        recipients = list(b.get("recipients") or [])
        if b.get("recipient"):
            recipients.append(b["recipient"])
        if not recipients:
            return self._err(h, call, 400, "Couldn't process request - please provide at least one recipient")
        if b["number"] != self.number:
            if self.mode.startswith("json-rpc"):     # getJsonRpc2Client: the daemon has no such account (client.go)
                return self._err(h, call, 400, "Number not registered with JSON-RPC")
            return self._err(h, call, 400, "User %s is not registered." % b["number"])
        groups = [r for r in recipients if r.startswith("group.")]
        numbers = [r for r in recipients if r.startswith("+") or _FAKE_UUID_RE.match(r)]
        users = [r for r in recipients if r not in groups and r not in numbers]
        if groups and (numbers or users):
            return self._err(h, call, 400, "Signal Messenger Groups and phone numbers cannot be specified "
                                           "together in one request! Please split them up into multiple "
                                           "REST API calls.")
        if len(groups) > 1:
            return self._err(h, call, 400, "A signal message cannot be sent to more than one group at once! "
                                           "Please use multiple REST API calls for that.")
        for g in groups:
            try:
                internal = self.internal_group_id(g)
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return self._err(h, call, 400, "Invalid group id")
            if internal not in self.groups:
                return self._err(h, call, 400, "Failed to send message: Group not found")
        for n in numbers:
            if n.startswith("+") and not re.match(r"^\+[1-9][0-9]{5,17}$", n):
                return self._err(h, call, 400, "Invalid phone number '%s'" % n)
        atts = []
        for item in b.get("base64_attachments") or []:
            att = self._decode_b64_attachment(item)
            if isinstance(att, str):
                return self._err(h, call, 400, att)
            atts.append(att)
        if b.get("view_once") and not atts:
            return self._err(h, call, 400, "'view_once' can only be set for image attachments!")
        if b.get("quote_timestamp") is not None and not b.get("quote_author"):
            return self._err(h, call, 400, "Quote author parameter is missing")
        message = b.get("message") or ""
        if not message and not atts and not b.get("sticker") and b.get("quote_timestamp") is None:
            return self._err(h, call, 400, "Sending empty message is not allowed, either a message, "
                                           "attachment or sticker must be given.")
        sends = [cat for cat in (groups, numbers, users) if cat]
        elements, failed_all, failed_any, reasons = [], True, False, set()
        for cat in sends:
            elem = {"timestamp": str(self._next_ts())}
            failures = [{"number": r if r.startswith("+") else None,
                         "uuid": r if _FAKE_UUID_RE.match(r) else None,
                         "username": r if r in users else None,
                         "reason": self.recipient_failures[r]} for r in cat if r in self.recipient_failures]
            if failures:
                elem["errors"] = {"recipients": failures}
                failed_any = True
                reasons.update(f["reason"] for f in failures)
            if len(failures) < len(cat):
                failed_all = False
            elements.append(elem)
        call["attachments"] = atts
        call["timestamps"] = [int(e["timestamp"]) for e in elements]
        json_rpc = self.mode.startswith("json-rpc")
        if failed_all:
            if json_rpc and reasons == {"RATE_LIMIT_FAILURE"}:
                return self._send_json(h, call, 429, {
                    "error": "Failed to send message due to rate limiting. Use the attached challenge tokens "
                             "to lift the rate limit.", "challenge_tokens": ["fake-challenge-token"],
                    "account": self.number})
            if json_rpc and reasons == {"IDENTITY_FAILURE"}:
                return self._err(h, call, 400, "Unable to complete request due to untrusted recipient keys")
            return self._err(h, call, 400, "Failed to send message")
        if self.send_shape == "array":
            return self._send_json(h, call, 201, elements)
        if failed_any and not json_rpc:
            return self._err(h, call, 400, "Failed to send (some) messages: " + ", ".join(sorted(reasons)))
        return self._send_json(h, call, 201, {"timestamp": elements[0]["timestamp"]})

    @staticmethod
    def _decode_b64_attachment(item):
        mime, filename, data = None, None, item
        if item.startswith("data:"):
            idx = item.rfind("base64,")
            if idx < 0:
                return "Couldn't process request - invalid data URI"
            header, data = item[:idx], item[idx + len("base64,"):]
            for part in header.split(";"):
                if part.startswith("data:"):
                    mime = part[5:] or None
                elif part.startswith("filename="):
                    filename = part[len("filename="):]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            return "illegal base64 data: %s" % e
        return {"mime": mime or _fake_sniff(raw).split(";")[0], "filename": filename, "data": raw}

    def _require(self, h, call, b, fields):
        for f in fields:
            v = b.get(f)
            if v is None or v == "":
                self._err(h, call, 400, "Couldn't process request - %s missing" % f)
                return False
        return True

    def _reaction(self, h, call):
        b = self._body(h, call, {"recipient": "str", "reaction": "str", "target_author": "str", "timestamp": "int"})
        if b is None:
            return
        needed = ("recipient", "reaction", "target_author", "timestamp") if call["method"] == "POST" \
            else ("recipient", "target_author", "timestamp")
        if not self._require(h, call, b, needed):
            return
        if call["method"] == "DELETE" and not b.get("reaction"):
            call["reaction"] = "\U0001F44D"
        return self._send_raw(h, call, 204)

    def _remote_delete(self, h, call):
        b = self._body(h, call, {"recipient": "str", "timestamp": "int"})
        if b is None or not self._require(h, call, b, ("recipient", "timestamp")):
            return
        return self._send_json(h, call, 201, {"timestamp": str(self._next_ts())})

    def _simple(self, h, call, fields):
        b = self._body(h, call, {f: "str" for f in fields})
        if b is None or not self._require(h, call, b, fields):
            return
        return self._send_raw(h, call, 204)

    def _receipt(self, h, call):
        b = self._body(h, call, {"recipient": "str", "receipt_type": "str", "timestamp": "int"})
        if b is None or not self._require(h, call, b, ("recipient", "timestamp")):
            return
        if b.get("receipt_type") not in ("read", "viewed"):
            return self._err(h, call, 400, "Couldn't process request - receipt type needs to be either "
                                           "'read' or 'viewed'")
        return self._send_raw(h, call, 204)

    def _trust(self, h, call, other):
        b = self._body(h, call, {"trust_all_known_keys": "bool", "verified_safety_number": "str"})
        if b is None:
            return
        if not b.get("trust_all_known_keys") and not b.get("verified_safety_number"):
            return self._err(h, call, 400, "Couldn't process request - verified_safety_number or "
                                           "trust_all_known_keys missing")
        with self._lock:
            self.trusted.append(other)
        return self._send_raw(h, call, 204)

    def _attachment(self, h, call, aid):
        if not aid or "/" in aid or ".." in aid:
            return self._err(h, call, 400, "Couldn't process request - invalid attachment name")
        with self._lock:
            data = self.attachments.get(aid)
        if data is None:
            return self._err(h, call, 404, "No attachment with that name found")
        if call["method"] == "DELETE":
            with self._lock:
                self.attachments.pop(aid, None)
            return self._send_raw(h, call, 204)
        return self._send_raw(h, call, 200, bytes(data), ctype=_fake_sniff(data), record=b"")

    def _group_entry(self, internal, g):
        return {"name": g.get("name", ""), "description": g.get("description", ""),
                "id": self.rest_group_id(internal), "internal_id": internal,
                "members": list(g.get("members", [])), "blocked": False, "member": True,
                "pending_invites": [], "pending_requests": [], "invite_link": "",
                "admins": [self.number],
                "permissions": {"add_members": "only-admins", "edit_group": "only-admins",
                                "send_messages": "every-member"}}

    def _groups(self, h, call):
        if call["method"] == "GET":
            with self._lock:
                items = list(self.groups.items())
            return self._send_json(h, call, 200, [self._group_entry(i, g) for i, g in items])
        b = self._body(h, call, {"name": "str", "members": "strlist", "description": "str", "permissions": "dict",
                                 "group_link": "str", "expiration_time": "int"})
        if b is None:
            return
        rest_id = self.add_group(b.get("name") or "", b.get("members") or [],
                                 description=b.get("description") or "")
        return self._send_json(h, call, 201, {"id": rest_id})

    def _group(self, h, call, rest_id):
        try:
            internal = self.internal_group_id(rest_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            internal = None
        with self._lock:
            g = self.groups.get(internal) if internal else None
        if g is None:
            return self._err(h, call, 404, "No group with that id found")
        return self._send_json(h, call, 200, self._group_entry(internal, g))

    def _group_update(self, h, call, rest_id):
        # PUT /v1/groups/{number}/{groupid} {name, description, ...} -> 204 (signal-cli-rest-api src/api/api.go UpdateGroup)
        b = self._body(h, call, {"name": "str", "description": "str", "base64_avatar": "str", "expiration_time": "int",
                                 "group_link": "str"})
        if b is None:
            return
        try:
            internal = self.internal_group_id(rest_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            internal = None
        with self._lock:
            g = self.groups.get(internal) if internal else None
            if g is not None:
                g.update({k: b[k] for k in ("name", "description") if b.get(k) is not None})
        if g is None:
            return self._err(h, call, 400, "No group with that id found")
        return self._send_raw(h, call, 204)

    # -- receive: polling -----------------------------------------------------------------------
    def _receive_poll(self, h, call):
        q = call["query"]
        try:
            timeout = int(q.get("timeout", "1"))
        except (TypeError, ValueError):
            return self._err(h, call, 400, "Couldn't process request - timeout needs to be numeric!")
        try:
            max_messages = int(q.get("max_messages", "0"))
        except (TypeError, ValueError):
            return self._err(h, call, 400, "Couldn't process request - max_messages needs to be numeric!")
        for flag in ("ignore_attachments", "ignore_stories", "ignore_avatars", "ignore_stickers",
                     "send_read_receipts"):
            if flag in q and q[flag] not in ("true", "false"):
                return self._err(h, call, 400, "Couldn't process request - %s parameter needs to be either "
                                               "'true' or 'false'" % flag)
        deadline = time.monotonic() + max(0.0, min(float(timeout), float(self.receive_max_wait)))
        with self._cond:
            while not self.pending and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            out = []
            while self.pending and (max_messages <= 0 or len(out) < max_messages):
                out.append(self.pending.popleft())
            self.delivered.extend(out)
        return self._send_raw(h, call, 200, _fake_dumps(out), ctype="text/plain; charset=utf-8", record=out)

    # -- receive: WebSocket (json-rpc mode) -----------------------------------------------------
    def _ws_upgrade(self, h, call):
        hd = call["headers"]
        conn_tokens = [t.strip().lower() for t in hd.get("connection", "").split(",")]
        upgrade_tokens = [t.strip().lower() for t in hd.get("upgrade", "").split(",")]
        if "upgrade" not in conn_tokens:
            return self._err(h, call, 400, "websocket: the client is not using the websocket protocol: "
                                           "'upgrade' token not found in 'Connection' header")
        if "websocket" not in upgrade_tokens:
            return self._err(h, call, 400, "websocket: the client is not using the websocket protocol: "
                                           "'websocket' token not found in 'Upgrade' header")
        if hd.get("sec-websocket-version", "").strip() != "13":
            return self._err(h, call, 400, "websocket: unsupported version: 13 not found in "
                                           "'Sec-Websocket-Version' header")
        key = hd.get("sec-websocket-key", "").strip()
        try:
            ok = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            return self._err(h, call, 400, "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header "
                                           "must be Base64 encoded value of 16-byte in length")
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _FAKE_WS_GUID).digest()).decode("ascii")
        with self._cond:
            call["status"] = 101
            call["response"] = "websocket"
        h._fake_responded = True
        h.close_connection = True
        h.send_response(101, "Switching Protocols")
        h.send_header("Upgrade", "websocket")
        h.send_header("Connection", "Upgrade")
        h.send_header("Sec-WebSocket-Accept", accept)
        h.end_headers()
        h.wfile.flush()
        wsock = _FakeWs(h)
        with self._cond:
            self._ws.append(wsock)
            self._bump()
        reader = threading.Thread(target=self._ws_reader, args=(wsock,), daemon=True, name="fake-wsock-reader")
        reader.start()
        try:
            self._ws_writer(wsock)
        except OSError:
            pass
        finally:
            _fake_shutdown_sock(wsock.sock)
            reader.join(2.0)
            with self._cond:
                if wsock in self._ws:
                    self._ws.remove(wsock)
                self._bump()

    def _ws_writer(self, wsock):
        last_ping = time.monotonic()
        while True:
            with self._cond:
                while not (wsock.queue or wsock.abort or wsock.close_req or wsock.peer_closed or self._stopping.is_set()):
                    now = time.monotonic()
                    next_ping = last_ping + float(self.ping_seconds)  # re-read: tests may change it
                    if now >= next_ping:
                        break
                    self._cond.wait(min(next_ping - now, 0.5))
                items = list(wsock.queue)
                wsock.queue.clear()
            if wsock.abort:
                return  # caller shuts the socket down: no close frame
            if self._stopping.is_set():
                try:
                    wsock.send_close(1001, "going away")
                except OSError:
                    pass
                return
            if wsock.peer_closed:
                return
            for obj in items:
                wsock.send(0x1, _fake_dumps(obj))
                with self._cond:
                    self.delivered.append(obj)
                    self._bump()
            if wsock.close_req:
                wsock.send_close(*wsock.close_req)
                self.wait_for(lambda f: wsock.peer_closed, 1.0)
                return
            if time.monotonic() >= last_ping + float(self.ping_seconds):
                wsock.send(0x9, b"")
                last_ping = time.monotonic()

    def _ws_reader(self, wsock):
        msg = None
        try:
            while True:
                fr = _fake_ws_read(wsock.h.rfile, max(int(self.read_limit), 125))
                if fr is None:
                    break
                if fr[0] == "too_big":
                    wsock.send_close(1009, "message too big")
                    break
                fin, op, masked, payload = fr
                if not masked:
                    wsock.send_close(1002, "client frames must be masked")
                    break
                if op in (0x0, 0x1, 0x2):
                    if op == 0x0 and msg is None:
                        wsock.send_close(1002, "unexpected continuation frame")
                        break
                    msg = bytearray(payload) if op != 0x0 else msg + payload
                    if len(msg) > self.read_limit:
                        wsock.send_close(1009, "message too big")
                        break
                    if fin:
                        with self._cond:
                            self.ws_received.append(bytes(msg).decode("utf-8", "replace"))
                            self._bump()
                        msg = None
                elif op == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    with self._cond:
                        self.ws_close_codes.append(code)
                    try:
                        wsock.send_close(code if code != 1005 else 1000)
                    except OSError:
                        pass
                    break
                elif op == 0x9:
                    wsock.send(0xA, payload)
                elif op == 0xA:
                    with self._cond:
                        self.pongs += 1
                        self._bump()
                else:
                    wsock.send_close(1002, "unknown opcode")
                    break
        except (OSError, ValueError, struct.error):
            pass
        finally:
            with self._cond:
                wsock.peer_closed = True
                self._bump()


# ----------------------------------------------------------------------------------------------
# clock
# ----------------------------------------------------------------------------------------------

class FakeClock:
    """Deterministic clock: time() / monotonic() only move through sleep() and advance()."""

    def __init__(self, start=1767225600.0, monotonic_start=1000.0):
        self._lock = threading.Lock()
        self._t = float(start)
        self._m = float(monotonic_start)
        self.sleeps = []

    def time(self):
        with self._lock:
            return self._t

    def time_ms(self):
        with self._lock:
            return int(self._t * 1000)

    def monotonic(self):
        with self._lock:
            return self._m

    def sleep(self, seconds):
        with self._lock:
            self.sleeps.append(seconds)
        self.advance(max(0.0, float(seconds)))

    def advance(self, seconds):
        with self._lock:
            self._t += seconds
            self._m += seconds

###############################################################################
# Harness: a bridge wired to the fakes ########################################
###############################################################################





FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
WEBHOOK_SECRET = "webhook-secret-" + "w" * 32
ENC_SECRET = "encryption-secret-" + "e" * 32
BRIDGE = "+15550000001"
OWNER = "+15550000002"
OWNER_UUID = "a1b2c3d4-e5f6-4a1b-9c2d-3e4f5a6b7c8d"
WAHA_KEY = "waha-key"


def fixture(name):
    """Load a payload of the project's own test data (testdata/NAME)."""
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return json.load(f)


def fresh(event, now=None):
    """A recorded WAHA webhook as if it happened *now*: its WhatsApp and envelope timestamps moved.

    The bridge refuses events older than retentionDays as replays; recorded ones are years old.
    """
    now = time.time() if now is None else now
    payload = event.get("payload") if isinstance(event.get("payload"), dict) else {}
    for obj, scale in ((payload, 1), (payload.get("after"), 1), (payload.get("before"), 1), (event, 1000)):
        if isinstance(obj, dict) and isinstance(obj.get("timestamp"), (int, float)) \
                and not isinstance(obj.get("timestamp"), bool):
            obj["timestamp"] = int(now * scale)
    return event


def raw_config(tmp_path, waha_url, rpc_url=None, rest_url=None, **sections):
    """A config dict pointing at the fakes; keyword args override top-level sections (dicts are merged)."""
    raw = {"server": {"host": "127.0.0.1", "port": 0},
           "whatsapp": {"apiUrl": waha_url, "apiKey": WAHA_KEY, "session": "default", "webhookSecret": WEBHOOK_SECRET},
           "signal": {"number": BRIDGE, "destination": OWNER},
           "database": {"path": str(tmp_path / "whatsignal.db")},
           "media": {"cacheDir": str(tmp_path / "cache"), "maxSizeMB": 5},
           "logLevel": "debug"}
    if rpc_url:
        raw["signal"]["rpcUrl"] = rpc_url
    if rest_url:
        raw["signal"]["apiUrl"] = rest_url
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k].update(v)
        else:
            raw[k] = v
    return raw


def make_config(raw, environ=None):
    env = {"WHATSIGNAL_ENCRYPTION_SECRET": ENC_SECRET}
    env.update(environ or {})
    return ws.validate_config(json.loads(json.dumps(raw)), env)


def eventually(predicate, timeout=10.0):
    """The suite's one bounded wait: poll `predicate` until it is truthy or `timeout` seconds pass.
    Returns the last truthy value or False; never waits longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = predicate()
        except Exception:
            got = False
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.02)


def http_request(url, method, path, body=None, headers=None, conn=None, timeout=10.0):
    """One HTTP request to `url` (or over the kept-alive `conn`). A dict body is sent as JSON.
    Returns (status, headers (case-insensitive), raw body bytes, parsed JSON body or None)."""
    u = urllib.parse.urlsplit(url)
    c = conn or http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    hdrs = {}
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode("utf-8")
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    try:
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        raw = r.read()
    finally:
        if conn is None:
            c.close()
    try:
        js = json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        js = None
    return r.status, r.headers, raw, js


def http_get(url, path="", headers=None):
    """GET `url` + `path`; returns (status, body text)."""
    status, _, raw, _ = http_request(url, "GET", urllib.parse.urlsplit(url).path + path or "/", headers=headers)
    return status, raw.decode("utf-8", "replace")


def sign(body, secret=WEBHOOK_SECRET):
    """WAHA's X-Webhook-Hmac: hex HMAC-SHA512 of the exact body bytes."""
    return FakeWaha.sign(body, secret)


def signed_headers(body, secret=WEBHOOK_SECRET, ctype="application/json"):
    return {"Content-Type": ctype, "X-Webhook-Hmac": sign(body, secret), "X-Webhook-Hmac-Algorithm": "sha512"}


def post_signed(h, body, secret=WEBHOOK_SECRET, conn=None, **hdr):
    """POST a signed webhook to the bridge `h`; returns what http_request returns."""
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":")).encode()
    headers = signed_headers(body, secret)
    headers.update(hdr)
    return http_request(h.url, "POST", "/webhook/whatsapp", body, headers, conn=conn)


def free_port():
    """A loopback port that was free a moment ago (for child processes that must bind a known port)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def run_main(capsys, argv, environ):
    """Run ws.main in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = ws.main(argv, environ)
    out, err = capsys.readouterr()
    return rc, out, err


def bridge_env(secret=ENC_SECRET, **extra):
    """The environment of a bridge command: the encryption secret plus `extra` (a None value removes a key)."""
    env = {"WHATSIGNAL_ENCRYPTION_SECRET": secret}
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def write_config(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw), encoding="utf-8")
    return str(path)


class LogCapture(io.StringIO):
    """A thread-safe stream for ws.Log; ``records()`` parses the JSON lines."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def write(self, s):
        with self.lock:
            return super().write(s)

    def text(self):
        with self.lock:
            return self.getvalue()

    def records(self):
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]


# Who the WAHA fake knows by name (a few contacts and one group), in every harness.
ALICE = "15550000010@c.us"
BOB = "15550000011@c.us"
CAROL = "15550000012@c.us"
DORA = "15550000014@c.us"
FAMILY = "120363025555555555@g.us"
ADDRESS_BOOK = {ALICE: "Alice Example", BOB: "Bob Builder", CAROL: "Carol Work", DORA: "Dora Family"}
GROUP_NAMES = {FAMILY: "Family"}
BACKENDS = ("daemon", "rest", "rest-json-rpc")


class Harness:
    """A bridge under test: ws.App in-process on real sockets, wired to a FakeWaha and one Signal backend.

    backend: "daemon" (signal-cli daemon --http: JSON-RPC and SSE), "rest" (signal-cli-rest-api, normal mode:
    /v1/receive polling), "rest-json-rpc" (signal-cli-rest-api json-rpc mode: WebSocket), or any other
    "rest-<mode>" of FakeSignalRest. layout: None (one conversation) or "groups" (bridge.layout).
    send_shape: how the REST fake answers /v2/send ("object" | "array"). WAHA serves the sessions "default"
    and "work" and knows ADDRESS_BOOK and GROUP_NAMES. Nothing runs until start()."""

    def __init__(self, tmp_path, backend="daemon", layout=None, clock=None, raw_overrides=None, environ=None,
                 send_shape="object"):
        if backend != "daemon" and not backend.startswith("rest"):
            raise ValueError("unknown backend %r (daemon, rest, rest-json-rpc)" % backend)
        self.tmp_path = tmp_path
        self.backend = backend
        self.waha = FakeWaha(api_key=WAHA_KEY).start()
        self.waha.sessions.add("work")
        self.waha.contacts.update(ADDRESS_BOOK)
        self.waha.group_names.update(GROUP_NAMES)
        overrides = dict(raw_overrides or {})
        if layout:
            overrides["bridge"] = dict(overrides.get("bridge") or {}, layout=layout)
        if backend == "daemon":
            self.signal = FakeSignalDaemon(number=BRIDGE).start()
            self.raw = raw_config(tmp_path, self.waha.url, rpc_url=self.signal.url, **overrides)
        else:
            mode = backend[len("rest-"):] if backend.startswith("rest-") else "normal"
            self.signal = FakeSignalRest(number=BRIDGE, mode=mode, send_shape=send_shape).start()
            self.signal.receive_max_wait = 0.1   # short long-polls: the bridge stops quickly
            self.raw = raw_config(tmp_path, self.waha.url, rest_url=self.signal.url, **overrides)
            self.raw["signal"].setdefault("pollIntervalSeconds", 0.05)
        self.environ = environ
        self.clock = clock
        self.app = None
        self.logs = LogCapture()

    def start(self, connected=False):
        """Start the bridge; with `connected` (and the Signal fake serving), return once its event stream (daemon
        SSE, or the REST json-rpc WebSocket) is open, so that what the Signal fake delivers next reaches it."""
        config = make_config(self.raw, self.environ)
        kwargs = {"clock": self.clock} if self.clock else {}
        self.app = ws.App(config, ws.Log("debug", stream=self.logs), **kwargs).start()
        serving = self.signal.running and (self.signal.mode if self.backend == "daemon" else self.signal.fault) == "ok"
        if connected and serving and self.backend == "daemon":
            assert self.signal.wait_for(lambda f: f.stream_connections == 1, 5), "the bridge never opened its SSE stream"
        elif connected and serving and self.backend.startswith("rest-json-rpc"):
            assert self.signal.wait_for(lambda f: f.ws_connections == 1, 5), "the bridge never opened its WebSocket"
        return self

    def stop_app(self):
        """Stop the bridge only (the fakes keep running); the daemon fake sees its stream go."""
        self.app.stop()
        if isinstance(self.signal, FakeSignalDaemon) and self.signal.running:
            assert self.signal.wait_for(lambda f: f.stream_connections == 0, 5)

    def restart(self):
        self.stop_app()
        return self.start(connected=True)

    @property
    def url(self):
        return self.app.url

    def webhook(self, event, secret=WEBHOOK_SECRET, headers=None):
        return self.waha.webhook(self.app.url + "/webhook/whatsapp", event, secret, headers=headers)

    def received(self):
        """What the Signal side received from the bridge (successful sends), oldest first, the same on every
        backend: [{"to": number or None, "group": internal group id or None, "text", "atts": [(mime, filename,
        bytes)], "quote": (ts, author) or None, "quote_ts", "quote_author", "quote_text", "edit", "ts"}]."""
        out = []
        if isinstance(self.signal, FakeSignalDaemon):
            for r in self.signal.requests("send"):
                if r["error"] is not None:
                    continue
                p, q = r["params"], r.get("quote") or {}
                out.append({"to": (r.get("recipients") or [None])[0], "group": (r.get("group_ids") or [None])[0],
                            "text": p.get("message"),
                            "atts": [(a["mime"], a["filename"], a["data"]) for a in r["attachments"]],
                            "quote": (q["timestamp"], q.get("author")) if q else None,
                            "quote_ts": q.get("timestamp"), "quote_author": q.get("author"),
                            "quote_text": p.get("quoteMessage"), "edit": r.get("edit_timestamp"), "ts": r["timestamp"]})
            return out
        for c in self.signal.calls_for("/v2/send", "POST"):
            if not isinstance(c.get("status"), int) or not 200 <= c["status"] < 300:
                continue
            b = c["json"]
            rc = b["recipients"][0]
            group = FakeSignalRest.internal_group_id(rc) if rc.startswith("group.") else None
            out.append({"to": None if group else rc, "group": group, "text": b.get("message"),
                        "atts": [(a["mime"], a["filename"], a["data"]) for a in c["attachments"]],
                        "quote": ((b["quote_timestamp"], b.get("quote_author"))
                                  if b.get("quote_timestamp") is not None else None),
                        "quote_ts": b.get("quote_timestamp"), "quote_author": b.get("quote_author"),
                        "quote_text": b.get("quote_message"), "edit": b.get("edit_timestamp"),
                        "ts": c["timestamps"][0]})
        return out

    def texts(self, to=None):
        """The texts the Signal side received (all, or those sent to the number `to`), oldest first."""
        return [r["text"] for r in self.received() if to is None or r["to"] == to]

    def stop(self):
        """Stop the bridge and both fakes (the fakes side by side: each stop is bounded)."""
        if self.app:
            self.app.stop()
        stoppers = [threading.Thread(target=f.stop) for f in (self.waha, self.signal)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(15)
        assert not any(t.is_alive() for t in stoppers)


@pytest.fixture
def make_bridge(tmp_path):
    """Factory of bridges under test, each in its own directory: make_bridge(backend="daemon", start=True,
    **Harness options); make_bridge.many(dict(backend=...), ...) starts several side by side. Teardown stops
    them all in parallel, and their fakes must have met no internal error of their own."""
    made = []

    def make(backend="daemon", start=True, **kw):
        path = tmp_path / ("bridge%d" % len(made))
        path.mkdir()
        h = Harness(path, backend, **kw)
        made.append(h)
        return h.start(connected=True) if start else h

    def many(*specs):
        hs = [make(start=False, **spec) for spec in specs]
        threads = [threading.Thread(target=h.start) for h in hs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(h.app is not None for h in hs), "a bridge failed to start"
        return hs

    make.many = many
    yield make
    stoppers = [threading.Thread(target=h.stop) for h in made]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30)
    assert not any(t.is_alive() for t in stoppers)
    assert [e for h in made for e in h.waha.server_errors + h.signal.server_errors] == []


@pytest.fixture
def bridge(make_bridge):
    """A started bridge on the signal-cli daemon backend."""
    return make_bridge()


@pytest.fixture(params=["daemon", "rest"])
def each_backend(request, make_bridge):
    """A started bridge on each Signal backend."""
    return make_bridge(request.param)


###############################################################################
# Event builders: what WAHA posts to the bridge and what signal-cli delivers ##
###############################################################################

def new_mid():
    """A fresh WhatsApp message id (20 upper-case hex digits)."""
    return uuid.uuid4().hex[:20].upper()


def waha_event(event, payload, session="default"):
    """A current-shape WAHA webhook envelope around `payload` (as FakeWaha.event builds it)."""
    return FakeWaha(api_key=WAHA_KEY, session=session).event(event, payload)


def wa_payload(chat, mid, body="", ts=None, participant=None, from_me=False, source=None, push=None, **fields):
    """A GOWS WAMessage as WAHA's webhooks and its messages endpoint carry it: from `chat` with bare id `mid`;
    `participant` for groups, `push` the sender's push name; `source` ("app", "api") is there only for the owner's
    own messages unless given; other keyword arguments override payload fields."""
    sid = "%s_%s_%s" % ("true" if from_me else "false", chat, mid) + ("_" + participant if participant else "")
    p = {"id": sid, "timestamp": int(ts if ts is not None else time.time()), "from": chat, "fromMe": from_me,
         "body": body, "to": participant, "participant": participant, "hasMedia": False, "media": None,
         "ack": 1 if from_me else 2, "ackName": "SERVER" if from_me else "DEVICE", "location": None, "vCards": None,
         "replyTo": None, "_data": {"Info": {"PushName": push}} if push else {}}
    if from_me or source:
        p["source"] = source or "app"
    p.update(fields)
    return p


def wa_message(chat, mid, body="", participant=None, push=None, session="default", **payload_fields):
    """A WAHA `message` event (GOWS engine shape, wa_payload with source "app") from `chat` with bare id `mid`;
    other keyword arguments override payload fields."""
    payload = wa_payload(chat, mid, body, participant=participant, push=push, source="app")
    payload.update(payload_fields)
    return waha_event("message", payload, session)


def wa_image(chat, mid, url, mimetype="image/jpeg", body="a caption", filename=None):
    return wa_message(chat, mid, body, hasMedia=True,
                      media={"url": url, "mimetype": mimetype, "filename": filename, "error": None})


def wa_reaction(chat, target_wa, emoji, rid, target_from_me=False):
    target = "%s_%s_%s" % ("true" if target_from_me else "false", chat, target_wa)
    return waha_event("message.reaction", {
        "id": "false_%s_%s" % (chat, rid), "timestamp": int(time.time()), "from": chat, "fromMe": False,
        "source": "app", "to": None, "participant": None, "reaction": {"text": emoji, "messageId": target}})


def wa_edit(chat, target_wa, body, eid, participant=None):
    """`participant`: the group member who edits (the edit's id carries it, as a group message's does)."""
    return waha_event("message.edited", {
        "id": "false_%s_%s" % (chat, eid) + ("_" + participant if participant else ""), "timestamp": int(time.time()),
        "from": chat, "fromMe": False, "source": "app", "body": body, "to": None, "participant": participant,
        "hasMedia": False, "media": None, "replyTo": None, "editedMessageId": target_wa})


def wa_revoke(chat, target_wa, rid):
    return waha_event("message.revoked", {
        "after": {"id": "false_%s_%s" % (chat, rid), "timestamp": int(time.time()), "from": chat, "fromMe": False,
                  "source": "app", "body": None, "participant": None, "hasMedia": False},
        "before": None, "revokedMessageId": target_wa})


def wa_session_status(status):
    return waha_event("session.status", {"name": "default", "status": status, "statuses": [], "data": None})


_ts_lock = threading.Lock()
_ts_last = [0]


def new_ts():
    """A fresh sent-timestamp (ms) for the owner's envelopes, from a past base so that it can never equal
    a timestamp the fake daemon gives the bridge's own sends (those follow the wall clock)."""
    with _ts_lock:
        _ts_last[0] += 1
        return 1760000000000 + _ts_last[0] * 1000


def owner_env(ts, text=None, **data):
    """A current-shape envelope from the owner (signal-cli-jsonrpc.md section 4)."""
    dm = {"timestamp": ts, "message": text, "expiresInSeconds": 0, "isExpirationUpdate": False, "viewOnce": False}
    dm.update(data)
    return {"envelope": {"source": OWNER, "sourceNumber": OWNER, "sourceUuid": OWNER_UUID,
                         "sourceName": "Owner", "sourceDevice": 1, "timestamp": ts,
                         "serverReceivedTimestamp": ts + 120, "serverDeliveredTimestamp": ts + 180,
                         "dataMessage": dm},
            "account": BRIDGE}



def envelope(ts=None, text=None, source=OWNER, uuid_=OWNER_UUID, **dm):
    """An envelope from `source` (default: the owner); `dm` sets dataMessage fields."""
    ts = ts or new_ts()
    obj = owner_env(ts, text, **dm)
    env = obj["envelope"]
    env["source"] = source if source is not None else uuid_
    env["sourceNumber"] = source
    env["sourceUuid"] = uuid_
    return obj


def group_envelope(ts, text, group_id, **dm):
    return envelope(ts, text, groupInfo={"groupId": group_id, "groupName": "x", "revision": 1, "type": "DELIVER"},
                    **dm)


def bridge_quote(ts, text="quoted"):
    """The dataMessage.quote of an owner's reply to the bridge's message sent at `ts`."""
    return {"id": ts, "author": BRIDGE, "authorNumber": BRIDGE, "authorUuid": "0d1c2b3a-4f5e-4a6b-8c7d-9e0f1a2b3c4d",
            "text": text, "attachments": []}


def owner_push(h, text=None, ts=None, source=OWNER, uuid_=OWNER_UUID, **dm):
    """The owner (or `source`) writes in Signal: the envelope goes out on the Signal fake; returns its timestamp."""
    obj = envelope(ts, text, source, uuid_, **dm)
    assert h.signal.push(obj)
    return obj["envelope"]["timestamp"]


def signal_fixture(name, ts=None, source=OWNER):
    """A signal-cli test-data envelope with the sender rewritten to `source` and its timestamps made fresh."""
    obj = copy.deepcopy(fixture(name))
    env = obj["envelope"] if "envelope" in obj else obj["params"].get("result", obj["params"])["envelope"]
    ts = ts or new_ts()
    if source is not None:
        env["source"] = source
        env["sourceNumber"] = source
        if source == OWNER:
            env["sourceUuid"] = OWNER_UUID
    env["timestamp"] = ts
    for key in ("dataMessage", "typingMessage"):
        if isinstance(env.get(key), dict) and "timestamp" in env[key]:
            env[key]["timestamp"] = ts
    return obj


def queue_rows(h, direction, state=None):
    """The bridge's queue rows of one direction ("w2s" / "s2w"), oldest first, optionally of one state."""
    rows = h.app.store.query("SELECT * FROM queue WHERE direction=? ORDER BY id", (direction,))
    return [r for r in rows if state is None or r["state"] == state]

###############################################################################
# Appliance core ##############################################################
###############################################################################

# ---------------------------------------------------------------------------
# Issue 2: the appliance core (configuration, encryption at rest, store, the
# webhook/health/metrics server, logging, command line, packaging).
# ---------------------------------------------------------------------------



WS_PATH = os.path.abspath(ws.__file__)
REPO_DIR = os.path.dirname(WS_PATH)
EXAMPLE_CONFIG = os.path.join(REPO_DIR, "config.example.json")
PEER = "4915123456789"                 # a WhatsApp contact (German mobile)
PEER_JID = PEER + "@c.us"
NOT_OWNER = "+15550009999"              # someone who is not the owner
TEXT = "Meet me at the old lighthouse xyzzy-7731"
REPLY = "Bring the blue umbrella plugh-4402"
PEER_NAME = "Zebulon Quixote"
PEER_SHOWN = "~%s (+%s)" % (PEER_NAME, PEER)   # a push name, not a saved contact: marked
REMOVE_KEY = object()
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
LOG_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


# -- helpers ------------------------------------------------------------------------------------

DEAD_URL = "http://127.0.0.1:9"   # never contacted by the offline commands


def offline_raw(tmp_path, **sections):
    """A valid config dict whose upstream URLs are never contacted (validation and offline commands)."""
    return raw_config(tmp_path, DEAD_URL, rpc_url=DEAD_URL, **sections)


def set_key(raw, path, value):
    """Set (or delete with REMOVE_KEY) a dotted key in a raw config dict."""
    parts = path.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if value is REMOVE_KEY:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def error_lines(err):
    return [line for line in err.splitlines() if line.strip()]


def bridge_addr(h):
    return h.app.server.server_address[:2]


def queue_count(h):
    return h.app.store.one("SELECT COUNT(*) FROM queue")[0]


def round_trip(h, text=TEXT, reply=REPLY):
    """WhatsApp message in (signed webhook), Signal copy out, owner reply back to the WhatsApp chat."""
    assert h.webhook(wa_message(PEER_JID, "3EB0C0RE00000001", text, _data={"notifyName": PEER_NAME})) == (200, {"status": "stored"})
    assert eventually(lambda: len(h.texts()) >= 1), "the message never reached Signal"
    assert h.texts() == ["%s: %s" % (PEER_SHOWN, text)]
    # the copy's mapping is recorded just after the send returns: the plain reply needs it
    assert eventually(lambda: h.app.store.one("SELECT COUNT(*) FROM messages")[0] >= 1)
    h.signal.push(owner_env(int(time.time() * 1000), reply))
    assert h.waha.wait_for(lambda f: f.sent("text"), 10), "the owner's reply never reached WAHA"
    sent = h.waha.sent("text")[-1]
    assert (sent["chatId"], sent["text"]) == (PEER_JID, reply)
    assert eventually(lambda: h.app.store.queue_depth("w2s") == 0 and h.app.store.queue_depth("s2w") == 0)


def db_bytes(path):
    """Raw bytes of the database file and its WAL (what a stolen volume would expose)."""
    data = b""
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                data += f.read()
    return data


def clean_env(**extra):
    names = set(ws.ENV_OVERRIDES) | {"WEBHOOK_SECRET", "WAHA_API_KEY"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHATSIGNAL") and k not in names}
    env.update(extra)
    return env


def metric_value(text, name, **labels):
    """Value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', head[len(name):]))
            if got == {k: str(v) for k, v in labels.items()}:
                return float(value)
    return None


# -- Configuration ---------------------------------------------------------------------------------

# (id, config changes, environment changes, key path the one line starts with, must contain, must not contain)
BROKEN_CONFIGS = [
    ("unknown-key", {"whatsapp.webhookSecrt": "x" * 40}, {},
     "whatsapp.webhookSecrt:", ["unknown key", "did you mean whatsapp.webhookSecret?"], ["x" * 40]),
    ("unknown-top-key", {"retentionDay": 30}, {}, "retentionDay:", ["did you mean retentionDays?"], []),
    ("port-is-string", {"server.port": "8082"}, {}, "server.port:", ["expected int"], []),
    ("bool-is-string", {"whatsapp.mirrorDeletes": "yes"}, {}, "whatsapp.mirrorDeletes:", ["expected bool"], []),
    ("int-is-bool", {"retentionDays": True}, {}, "retentionDays:", ["expected int"], []),
    ("url-without-scheme", {"whatsapp.apiUrl": "localhost:3000"}, {}, "whatsapp.apiUrl:", ["http"], []),
    ("url-wrong-scheme", {"signal.rpcUrl": "ftp://127.0.0.1:8080"}, {}, "signal.rpcUrl:", ["http"], []),
    ("bridge-number-not-e164", {"signal.number": "4930123456"}, {}, "signal.number:", ["E.164"], ["4930123456"]),
    ("owner-number-not-e164", {"signal.destination": "04930123457"}, {}, "signal.destination:", ["E.164"],
     ["04930123457"]),
    ("owner-is-bridge", {"signal.destination": BRIDGE}, {}, "signal.destination:", ["own number"], []),
    ("both-signal-urls", {"signal.apiUrl": "http://127.0.0.1:8081"}, {}, "signal:",
     ["signal.rpcUrl", "signal.apiUrl", "exactly one"], []),
    ("no-signal-url", {"signal.rpcUrl": REMOVE_KEY}, {}, "signal:", ["signal.rpcUrl", "signal.apiUrl"], []),
    ("short-webhook-secret", {"whatsapp.webhookSecret": "short-secret-val"}, {}, "whatsapp.webhookSecret:",
     ["32"], ["short-secret-val"]),
    ("no-webhook-secret", {"whatsapp.webhookSecret": REMOVE_KEY}, {}, "whatsapp.webhookSecret:",
     ["WEBHOOK_SECRET"], []),
    ("short-encryption-secret", {}, {"WHATSIGNAL_ENCRYPTION_SECRET": "tinysecretvalue"},
     "WHATSIGNAL_ENCRYPTION_SECRET:", ["32"], ["tinysecretvalue"]),
    ("no-encryption-secret", {}, {"WHATSIGNAL_ENCRYPTION_SECRET": None}, "WHATSIGNAL_ENCRYPTION_SECRET:",
     ["not set", "WHATSIGNAL_ENABLE_ENCRYPTION=false"], []),
    ("missing-env-variable", {"whatsapp.apiKey": "env:UNSET_VARIABLE"}, {}, "whatsapp.apiKey:",
     ["UNSET_VARIABLE", "not set"], []),
    ("missing-env-secret", {"whatsapp.webhookSecret": "env:UNSET_SECRET_VARIABLE"}, {}, "whatsapp.webhookSecret:",
     ["UNSET_SECRET_VARIABLE"], []),
    ("missing-required", {"whatsapp.apiUrl": REMOVE_KEY}, {}, "whatsapp.apiUrl:", ["missing"], []),
    ("missing-bridge-number", {"signal.number": REMOVE_KEY}, {}, "signal.number:", ["missing"], []),
    ("port-out-of-range", {"server.port": 70000}, {}, "server.port:", ["70000"], []),
    ("retention-out-of-range", {"retentionDays": 0}, {}, "retentionDays:", ["range"], []),
    ("bad-log-level", {"logLevel": "verbose"}, {}, "logLevel:", ["verbose"], []),
    ("secret-of-wrong-type", {"whatsapp.apiKey": 98765432109876}, {}, "whatsapp.apiKey:", ["expected str"],
     ["98765432109876"]),
    ("channels-duplicate-session",
     {"channels": [{"whatsappSession": "default", "signalDestination": OWNER},
                   {"whatsappSession": "default", "signalDestination": "+15550000003"}]}, {},
     "channels[1].whatsappSession:", ["twice"], []),
    ("channels-duplicate-owner",
     {"channels": [{"whatsappSession": "default", "signalDestination": OWNER},
                   {"whatsappSession": "work", "signalDestination": OWNER}]}, {},
     "channels[1].signalDestination:", ["channels[0]", "one channel", "own Signal number"], [OWNER]),
    ("channels-bad-number", {"channels": [{"whatsappSession": "default", "signalDestination": "12345"}]}, {},
     "channels[0].signalDestination:", ["E.164"], []),
    ("channels-unknown-key",
     {"channels": [{"whatsappSession": "default", "signalDestination": OWNER, "signalDest": OWNER}]}, {},
     "channels[0].signalDest:", ["unknown key"], []),
    ("channels-empty", {"channels": []}, {}, "channels:", ["non-empty"], []),
    ("no-owner-and-no-channels", {"signal.destination": REMOVE_KEY}, {}, "signal.destination:", ["missing", "channels"],
     []),
    ("channel-not-an-object", {"channels": ["default"]}, {}, "channels[0]:", ["must be an object"], []),
    ("channel-without-session", {"channels": [{"signalDestination": OWNER}]}, {}, "channels[0].whatsappSession:",
     ["missing"], []),
    ("channel-without-owner", {"channels": [{"whatsappSession": "default"}]}, {}, "channels[0].signalDestination:",
     ["missing"], []),
    ("media-retention-zero", {"media.retentionDays": 0}, {}, "media.retentionDays:", ["at least 1"], []),
    ("request-timeout-out-of-range", {"server.requestTimeoutSeconds": 1000}, {}, "server.requestTimeoutSeconds:",
     ["0.5-600"], []),
    ("cleanup-interval-zero", {"cleanupIntervalHours": 0}, {}, "cleanupIntervalHours,", ["must be > 0"], []),
    ("catch-up-negative", {"bridge.catchUpHours": -1}, {}, "bridge.catchUpHours", ["must be >= 0"], []),
]


class TestConfiguration:
    def test_example_config_passes_check_config_with_masked_output(self, capsys, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        api_key = "waha-api-key-" + "k" * 30
        env = bridge_env(WAHA_API_KEY=api_key, WEBHOOK_SECRET=WEBHOOK_SECRET)
        with open(EXAMPLE_CONFIG, encoding="utf-8") as f:
            json.load(f)   # valid JSON, no comments
        rc, out, err = run_main(capsys, ["--config", EXAMPLE_CONFIG, "check-config"], env)
        assert rc == 0, err
        assert "configuration OK" in err
        tree = json.loads(out)
        assert tree["whatsapp"]["apiUrl"] == "http://localhost:3000"
        assert tree["whatsapp"]["apiKey"] == "***(%d chars)" % len(api_key)
        assert tree["whatsapp"]["webhookSecret"] == "***(%d chars)" % len(WEBHOOK_SECRET)
        assert tree["signal"]["number"] == "+1555*****01"
        assert tree["signal"]["destination"] == "+1555*****02"
        assert tree["channels"] == [{"whatsappSession": "default", "signalDestination": "+1555*****02"}]
        assert tree["encryption"]["enabled"] is True
        for leak in (api_key, WEBHOOK_SECRET, ENC_SECRET, "15550000001", "15550000002"):
            assert leak not in out and leak not in err
        assert not os.listdir(tmp_path), "check-config must not create the database or cache"

    @pytest.mark.parametrize("case", BROKEN_CONFIGS, ids=[c[0] for c in BROKEN_CONFIGS])
    def test_broken_config_one_line_naming_the_key(self, capsys, tmp_path, case):
        _, changes, env_changes, prefix, contains, forbidden = case
        raw = offline_raw(tmp_path)
        for path, value in changes.items():
            set_key(raw, path, value)
        rc, out, err = run_main(capsys, ["--config", write_config(tmp_path, raw), "check-config"],
                                 bridge_env(**env_changes))
        assert rc == 2
        assert out == "", "nothing is printed to stdout for a broken config"
        assert "Traceback" not in err
        lines = error_lines(err)
        assert len(lines) == 1, lines
        assert lines[0].startswith("config error: " + prefix + " "), lines[0]
        for word in contains:
            assert word in lines[0], (word, lines[0])
        for leak in forbidden:
            assert leak not in err, "the config error echoes %r" % leak

    def test_several_problems_give_one_line_each(self, capsys, tmp_path):
        raw = offline_raw(tmp_path)
        set_key(raw, "server.prot", 8082)
        set_key(raw, "whatsapp.apiUrl", "waha:3000")
        set_key(raw, "media.maxSizeMB", "50")
        set_key(raw, "whatsapp.apiKey", "env:UNSET_KEY_VARIABLE")
        rc, out, err = run_main(capsys, ["--config", write_config(tmp_path, raw), "check-config"], bridge_env())
        assert rc == 2 and out == "" and "Traceback" not in err
        lines = error_lines(err)
        assert sorted(line.split(":")[1].strip() for line in lines) == \
            ["media.maxSizeMB", "server.prot", "whatsapp.apiKey", "whatsapp.apiUrl"], lines
        assert "did you mean server.port?" in err

    def test_invalid_json_and_non_object(self, capsys, tmp_path):
        bad = tmp_path / "bad.json"
        bad.write_text('{"server": {"port": 8082,}}', encoding="utf-8")
        rc, out, err = run_main(capsys, ["--config", str(bad), "check-config"], bridge_env())
        assert rc == 2 and "Traceback" not in err
        lines = error_lines(err)
        assert len(lines) == 1 and "not valid JSON" in lines[0] and "line 1 column" in lines[0], lines
        bad.write_text("[1, 2]", encoding="utf-8")
        rc, out, err = run_main(capsys, ["--config", str(bad), "check-config"], bridge_env())
        assert rc == 2 and len(error_lines(err)) == 1 and "JSON object" in err

    def test_env_overrides(self, capsys, tmp_path):
        raw = offline_raw(tmp_path)
        del raw["whatsapp"]["webhookSecret"]
        env = bridge_env(WHATSAPP_API_URL="http://waha.internal:3001", SIGNAL_RPC_URL="http://signal-cli:8090",
                       DB_PATH=str(tmp_path / "other" / "x.db"), MEDIA_DIR=str(tmp_path / "media"),
                       WEBHOOK_SECRET=WEBHOOK_SECRET)
        rc, out, err = run_main(capsys, ["--config", write_config(tmp_path, raw), "check-config"], env)
        assert rc == 0, err
        tree = json.loads(out)
        assert tree["whatsapp"]["apiUrl"] == "http://waha.internal:3001"
        assert tree["signal"]["rpcUrl"] == "http://signal-cli:8090"
        assert tree["database"]["path"] == str(tmp_path / "other" / "x.db")
        assert tree["media"]["cacheDir"] == str(tmp_path / "media")
        assert tree["whatsapp"]["webhookSecret"] == "***(%d chars)" % len(WEBHOOK_SECRET)

    def test_signal_rpc_url_override_replaces_rest_url(self, tmp_path):
        raw = raw_config(tmp_path, "http://127.0.0.1:3000", rest_url="http://127.0.0.1:8081")
        cfg = make_config(raw, {"SIGNAL_RPC_URL": "http://127.0.0.1:8080"})
        assert (cfg.get("signal.rpcUrl"), cfg.get("signal.apiUrl")) == ("http://127.0.0.1:8080", None)

    def test_whatsignal_config_env_stands_in_for_config_flag(self, capsys, tmp_path):
        path = write_config(tmp_path, offline_raw(tmp_path))
        rc, out, err = run_main(capsys, ["check-config"], bridge_env(WHATSIGNAL_CONFIG=path))
        assert rc == 0, err
        assert json.loads(out)["database"]["path"] == str(tmp_path / "whatsignal.db")

    def test_encryption_on_unless_explicitly_false(self, tmp_path):
        raw = offline_raw(tmp_path)
        assert make_config(raw).encryption is True
        assert make_config(raw, {"WHATSIGNAL_ENABLE_ENCRYPTION": "true"}).encryption is True
        for off in ("false", "FALSE", "0"):
            cfg = ws.validate_config(json.loads(json.dumps(raw)), {"WHATSIGNAL_ENABLE_ENCRYPTION": off})
            assert cfg.encryption is False
            assert cfg.masked()["encryption"] == {"enabled": False, "secret": None}

    def test_encryption_disabled_warns_at_start(self, make_bridge):
        h = make_bridge(start=False, environ={"WHATSIGNAL_ENABLE_ENCRYPTION": "false"}).start()
        warns = [r for r in h.logs.records() if r["level"] == "WARN" and "encryption" in r["msg"].lower()]
        assert len(warns) == 1, h.logs.text()
        assert "DISABLED" in warns[0]["msg"]
        h.restart()   # "at every start"
        warns = [r for r in h.logs.records() if r["level"] == "WARN" and "encryption" in r["msg"].lower()]
        assert len(warns) == 2

    def test_encryption_enabled_does_not_warn(self, bridge):
        assert not [r for r in bridge.logs.records() if r["level"] == "WARN"]

    def test_two_channels(self, tmp_path):
        raw = offline_raw(tmp_path)
        raw["channels"] = [{"whatsappSession": "default", "signalDestination": OWNER},
                           {"whatsappSession": "work", "signalDestination": "+15550000003"}]
        cfg = make_config(raw)
        assert cfg.channels == [ws.Channel("default", OWNER), ws.Channel("work", "+15550000003")]
        assert cfg.channel("work").destination == "+15550000003"
        assert cfg.channel("nope") is None

    def test_single_channel_from_session_and_destination(self, tmp_path):
        raw = offline_raw(tmp_path)
        raw["whatsapp"]["session"] = "personal"
        assert make_config(raw).channels == [ws.Channel("personal", OWNER)]

    def test_serve_refuses_a_broken_config_the_same_way(self, capsys, tmp_path):
        raw = offline_raw(tmp_path)
        set_key(raw, "server.port", "eighty")
        path = write_config(tmp_path, raw)
        for argv in (["--config", path, "serve"], ["--config", path]):
            rc, out, err = run_main(capsys, argv, bridge_env())
            assert rc == 2 and "Traceback" not in err
            assert error_lines(err) == [l for l in error_lines(err) if l.startswith("config error: server.port:")]
            assert len(error_lines(err)) == 1
        assert not (tmp_path / "whatsignal.db").exists()


# -- Pure helpers ---------------------------------------------------------------------------------

class TestPureHelpers:
    @pytest.mark.parametrize("value,masked", [
        ("+491512345689", "+4915******89"),
        ("+15550000002", "+1555*****02"),
        ("4915123456789@c.us", "4915*******89@c.us"),
        ("12345678", "12****78"),
        ("1234", "****"),
        ("", "?"),
        (None, "?"),
    ])
    def test_mask_phone(self, value, masked):
        assert ws.mask_phone(value) == masked

    def test_verify_waha_signature(self):
        body = b'{"event":"message","session":"default"}'
        sig = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha512).hexdigest()
        assert ws.verify_waha_signature(WEBHOOK_SECRET, body, sig, "sha512")
        assert ws.verify_waha_signature(WEBHOOK_SECRET, body, sig.upper(), "SHA512")
        assert ws.verify_waha_signature(WEBHOOK_SECRET, body, sig, None)      # WAHA default algorithm
        assert not ws.verify_waha_signature(WEBHOOK_SECRET, body + b" ", sig, "sha512")   # exact bytes
        assert not ws.verify_waha_signature(WEBHOOK_SECRET, body, sig, "sha256")
        assert not ws.verify_waha_signature(WEBHOOK_SECRET, body, None, "sha512")
        assert not ws.verify_waha_signature(WEBHOOK_SECRET, body, "", "sha512")
        assert not ws.verify_waha_signature("other-secret-" + "o" * 32, body, sig, "sha512")
        assert not ws.verify_waha_signature(None, body, sig, "sha512")
        sha256 = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert not ws.verify_waha_signature(WEBHOOK_SECRET, body, sha256, "sha512")

    def test_next_backoff(self):
        assert ws.next_backoff(0, rand=lambda: 0.0) == ws.BACKOFF_START * 0.5
        assert ws.next_backoff(0, rand=lambda: 1.0) == ws.BACKOFF_START
        assert ws.next_backoff(3, rand=lambda: 1.0) == ws.BACKOFF_START * ws.BACKOFF_FACTOR ** 3
        assert ws.next_backoff(1000, rand=lambda: 1.0) == ws.BACKOFF_CAP
        assert ws.next_backoff(10 ** 9, rand=lambda: 0.999) <= ws.BACKOFF_CAP
        delays = [ws.next_backoff(a, rand=lambda: 0.5) for a in range(12)]
        assert delays == sorted(delays)

    @pytest.mark.parametrize("jid,canon", [
        ("4915123456789@s.whatsapp.net", PEER_JID),
        ("4915123456789:12@s.whatsapp.net", PEER_JID),
        (" 4915123456789@C.US ", PEER_JID),
        ("120363025246125486@g.us", "120363025246125486@g.us"),
        ("123456789012345@lid", "123456789012345@lid"),
        ("4915123456789", None),
        ("@c.us", None),
        ("x@evil.example", None),
        (None, None),
    ])
    def test_normalize_jid(self, jid, canon):
        assert ws.normalize_jid(jid) == canon

    def test_phone_and_jid(self):
        assert ws.jid_to_phone(PEER_JID) == "+" + PEER
        assert ws.jid_to_phone("120363025246125486@g.us") is None
        assert ws.phone_to_jid("+" + PEER) == PEER_JID
        assert ws.phone_to_jid("0049151") is None

    def test_token_bucket(self):
        clock = FakeClock()
        b = ws.TokenBucket(2, 0.5, clock=clock.monotonic)
        assert (b.take(), b.take()) == (0.0, 0.0)
        assert b.take() == pytest.approx(2.0)
        clock.advance(2.0)
        assert b.take() == 0.0

    def test_safe_filename_and_shorten(self):
        assert ws.safe_filename("../../etc/passwd", "text/plain") == "passwd"
        assert ws.safe_filename("..\\..\\boot.ini", None) == "boot.ini"
        assert ws.safe_filename(".hidden", None) == "hidden"
        assert ws.safe_filename("", "image/jpeg") == "file.jpg"
        assert "/" not in ws.safe_filename("a/b\x00c;d", None)
        assert ws.shorten("a\n b   c") == "a b c"
        assert ws.shorten("x" * 100, 10) == "x" * 9 + "…"

    def test_sniff_and_media_type(self):
        assert ws.sniff_mime(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
        assert ws.media_type_ok("image/jpeg", b"\x89PNG\r\n\x1a\n....")
        assert not ws.media_type_ok("image/jpeg", b"MZ\x90\x00")
        assert not ws.media_type_ok("application/pdf", b"\x7fELF\x02")
        assert ws.media_type_ok("application/pdf", b"%PDF-1.7")

    def test_iso_now(self):
        assert ws.iso_now(lambda: 1767225600.7) == "2026-01-01T00:00:00Z"


# -- Encryption -----------------------------------------------------------------------------------

def expected_keys(secret, salt, n=2 ** 15, r=8, p=1):
    """Independent key schedule per Cipher's docstring: scrypt master key, HMAC-SHA256 subkeys."""
    master = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=64)
    sub = lambda label: hmac.new(master, b"whatsignal/v1/" + label, hashlib.sha256).digest()
    return sub(b"enc"), sub(b"mac"), sub(b"lookup")


def expected_seal(enc, mac, nonce, plaintext, aad):
    """02 || nonce || (plaintext XOR BLAKE2b(key=enc, nonce || counter64)) || HMAC-SHA256(mac, head || len32(aad) ||
    aad || ct)."""
    stream = b"".join(hashlib.blake2b(nonce + i.to_bytes(8, "big"), key=enc).digest()
                      for i in range((len(plaintext) + 63) // 64))
    ct = bytes(a ^ b for a, b in zip(plaintext, stream))
    head = b"\x02" + nonce
    return head + ct + hmac.new(mac, head + len(aad).to_bytes(4, "big") + aad + ct, hashlib.sha256).digest()


AAD = ws.seal_context("queue", "body", "default", "w2s", "0123")


KAT_SECRET = "known-answer-secret-" + "k" * 20
KAT_SALT = bytes(range(16))
KAT_NONCE = bytes(range(0xA0, 0xB0))


@pytest.fixture(scope="module")
def kat_cipher():
    # the parameters every database created before they were recorded uses (scrypt n=2^15, r=8, p=1)
    return ws.Cipher(KAT_SECRET, KAT_SALT, rand=lambda n: KAT_NONCE[:n], n=2 ** 15, r=8, p=1)


@pytest.fixture(scope="module")
def random_cipher():
    return ws.Cipher(ENC_SECRET, os.urandom(16))


class TestEncryption:
    def test_known_answer_vector(self, kat_cipher):
        enc, mac, lookup = expected_keys(KAT_SECRET, KAT_SALT)
        assert len({enc, mac, lookup}) == 3, "separate keys for encryption, authentication, lookup"
        for text in ("hi", "", "Grüße 👋 " * 20):   # 0, 1 and several keystream blocks
            sealed = kat_cipher.encrypt(text, AAD)
            assert sealed.hex() == expected_seal(enc, mac, KAT_NONCE, text.encode(), AAD).hex()
            assert kat_cipher.decrypt(sealed, AAD) == text
        expected_token = hmac.new(lookup, b"chat\x00" + PEER_JID.encode(), hashlib.sha256).hexdigest()[:32]
        assert kat_cipher.token("chat", PEER_JID) == expected_token
        # Pinned literals: a database written by this version must stay readable by the next.
        assert AAD == b"\x00\x05queue\x00\x04body\x00\x07default\x00\x03w2s\x00\x040123"
        assert kat_cipher.encrypt("hi", AAD).hex() == (
            "02a0a1a2a3a4a5a6a7a8a9aaabacadaeaf69d2baf6f7fac179949b3607cc368e27fd276da29058aa38267cfe9ea94ab2a1f29a")
        # version 1 (before values were bound to their place) is still read, by the upgrade and rotate-key only
        v1 = bytes.fromhex(
            "01a0a1a2a3a4a5a6a7a8a9aaabacadaeaf69d2fa4dceab8e647c2e0cf6c1b96e4c6e5aef1f470ab72c653e4eea85728deecac5")
        assert kat_cipher.decrypt_legacy(v1, b"") == b"hi"
        with pytest.raises(ws.CryptoError):
            kat_cipher.decrypt(v1, b"")
        assert kat_cipher.token("chat", PEER_JID) == "1de90d17b393e46b2e754ce0d21fa19e"

    def test_nonce_pool_hands_out_each_byte_once_across_refills_and_forks(self):
        pool = ws.NoncePool(size=40)                       # a refill every 2 nonces of 16 bytes
        nonces = [pool(16) for _ in range(200)]
        assert all(len(n) == 16 for n in nonces) and len(set(nonces)) == 200
        assert len(pool(100)) == 100                        # more than the pool holds: one read of that size
        if not hasattr(os, "fork"):
            return
        assert ws.NONCES(16)                                # the shared pool has bytes left to be copied by fork
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                        # the child: its pool starts empty, not the parent's
            try:
                os.write(write, ws.NONCES(16))
            finally:
                os._exit(0)
        os.close(write)
        try:
            child = os.read(read, 16)
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        assert len(child) == 16 and child != ws.NONCES(16)
        sealed = {ws.Cipher("s", b"salt" * 4, n=2, r=1, p=1).encrypt("same", AAD) for _ in range(2)}
        assert len(sealed) == 2                             # the default nonces differ

    def test_tokens_separate_domains_and_values(self, random_cipher):
        t = random_cipher.token("chat", PEER_JID)
        assert re.fullmatch(r"[0-9a-f]{32}", t)
        assert t == random_cipher.token("chat", PEER_JID)
        assert t != random_cipher.token("msg", PEER_JID)
        assert t != random_cipher.token("chat", "4915123456788@c.us")
        assert random_cipher.token("chat", None) is None

    def test_work_factor(self):
        assert ws.SCRYPT_N >= 2 ** 14 and ws.SCRYPT_R >= 8
        legacy_n, legacy_r, legacy_p = ws.SCRYPT_LEGACY
        # an attacker's work per guess (n*r*p block mixes) is at least the legacy one; memory stays at 16 MiB
        assert ws.SCRYPT_N * ws.SCRYPT_R * ws.SCRYPT_P >= legacy_n * legacy_r * legacy_p
        assert 128 * ws.SCRYPT_R * ws.SCRYPT_N <= 16 * 1024 * 1024

    def test_current_parameters_known_answer(self):
        cipher = ws.Cipher(KAT_SECRET, KAT_SALT, rand=lambda n: KAT_NONCE[:n])
        enc, mac, lookup = expected_keys(KAT_SECRET, KAT_SALT, ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
        assert cipher.encrypt("hi", AAD).hex() == expected_seal(enc, mac, KAT_NONCE, b"hi", AAD).hex()
        assert (ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P) != ws.SCRYPT_LEGACY

    @pytest.mark.parametrize("value", ["", "x", "Grüße 👋 مرحبا 你好", "a" * 63, "b" * 64, "c" * 65, "\ud800lone",
                                       "z" * 5000])
    def test_round_trip(self, random_cipher, value):
        sealed = random_cipher.encrypt(value, AAD)
        assert sealed[0] == 2 and len(sealed) == 1 + 16 + len(value.encode("utf-8", "surrogatepass")) + 32
        assert random_cipher.decrypt(sealed, AAD) == value
        if len(value) >= 8:
            assert value.encode("utf-8", "surrogatepass") not in sealed

    def test_round_trip_bytes_and_none(self, random_cipher):
        data = bytes(range(256))
        assert random_cipher.decrypt_bytes(random_cipher.encrypt(data, AAD), AAD) == data
        assert random_cipher.encrypt(None, AAD) is None and random_cipher.decrypt(None, AAD) is None

    def test_fresh_nonce_per_value(self, random_cipher):
        a, b = random_cipher.encrypt(TEXT, AAD), random_cipher.encrypt(TEXT, AAD)
        assert a != b and a[1:17] != b[1:17]
        assert random_cipher.decrypt(a, AAD) == random_cipher.decrypt(b, AAD) == TEXT

    def test_tamper_on_every_byte_is_detected(self, random_cipher):
        sealed = random_cipher.encrypt("attack at dawn, bring 4915123456789", AAD)
        for i in range(len(sealed)):
            for bit in (0x01, 0x80):
                forged = bytearray(sealed)
                forged[i] ^= bit
                with pytest.raises(ws.CryptoError):
                    random_cipher.decrypt(bytes(forged), AAD)
        for forged in (sealed[:-1], sealed[:20], sealed + b"\x00", b"", b"\x01", b"\x02", b"\x00plain"):
            with pytest.raises(ws.CryptoError):
                random_cipher.decrypt(forged, AAD)

    def test_a_value_opens_only_in_its_place(self, random_cipher):
        sealed = random_cipher.encrypt("4915123456789@c.us", ws.seal_context("messages", "wa_chat_enc", 7))
        assert random_cipher.decrypt(sealed, ws.seal_context("messages", "wa_chat_enc", 7)) == "4915123456789@c.us"
        for elsewhere in (ws.seal_context("messages", "wa_chat_enc", 8), ws.seal_context("messages", "wa_msg_enc", 7),
                          ws.seal_context("chats", "wa_chat_enc", 7), ws.seal_context("messages", "wa_chat_enc", "7", ""),
                          b""):
            with pytest.raises(ws.CryptoError):
                random_cipher.decrypt(sealed, elsewhere)
        # the key parts are length-prefixed, so ("a", "bc") and ("ab", "c") are different places
        assert ws.seal_context("t", "c", "a", "bc") != ws.seal_context("t", "c", "ab", "c")

    def test_other_key_is_rejected(self, random_cipher):
        other = ws.Cipher(ENC_SECRET + "!", os.urandom(16))
        with pytest.raises(ws.CryptoError):
            other.decrypt(random_cipher.encrypt("hello", AAD), AAD)

    def test_wrong_secret_at_unlock(self, tmp_path):
        path = str(tmp_path / "w.db")
        s = ws.Store(path)
        s.unlock(ENC_SECRET)
        assert s.enqueue("default", "w2s", "d1", PEER_JID, "message", {"body": TEXT}, 1.0)
        s.close()
        s = ws.Store(path)
        try:
            with pytest.raises(ws.CryptoError) as e:
                s.unlock("a-different-secret-" + "d" * 30)
            assert "WHATSIGNAL_ENCRYPTION_SECRET does not open this database" in str(e.value)
            with pytest.raises(ws.CryptoError) as e:
                s.unlock(None, enabled=False)
            assert "encryption" in str(e.value)
            s.unlock(ENC_SECRET)
            assert s.record_of(s.pending("w2s")[0])["body"] == TEXT
        finally:
            s.close()

    def test_wrong_secret_is_a_one_line_error_on_the_command_line(self, capsys, tmp_path):
        raw = offline_raw(tmp_path)
        s = ws.Store(raw["database"]["path"])
        s.unlock(ENC_SECRET)
        s.close()
        path = write_config(tmp_path, raw)
        rc, out, err = run_main(capsys, ["--config", path, "stats"],
                                 {"WHATSIGNAL_ENCRYPTION_SECRET": "b" * 40})
        assert rc == 2 and "Traceback" not in err
        lines = error_lines(err)
        assert len(lines) == 1 and "does not open this database" in lines[0], lines
        assert "b" * 40 not in err

    def test_key_check_value_stored(self, tmp_path):
        s = ws.Store(str(tmp_path / "k.db"))
        try:
            s.unlock(ENC_SECRET)
            salt = bytes.fromhex(s.meta("salt"))
            assert len(salt) == 16
            assert s.meta("kdf") == "scrypt n=%d r=%d p=%d" % (ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
            _, mac, _ = expected_keys(ENC_SECRET, salt, ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
            assert s.meta("key_check") == "enc1:" + hmac.new(mac, b"whatsignal key check",
                                                             hashlib.sha256).hexdigest()[:24]
            meta = dict(s.query("SELECT key, value FROM meta"))
            assert not any(ENC_SECRET in v for v in meta.values())
        finally:
            s.close()
        other = ws.Store(str(tmp_path / "k2.db"))
        try:
            other.unlock(ENC_SECRET)
            assert other.meta("salt") != salt.hex(), "the salt is random per database"
        finally:
            other.close()

    def test_raw_database_and_wal_hold_no_plaintext(self, bridge):
        h = bridge
        round_trip(h)
        path = h.app.store.path
        assert os.path.getsize(path + "-wal") > 0, "WAL mode: the recent writes sit in the -wal file"
        data = db_bytes(path)
        assert h.app.store.one("SELECT COUNT(*) FROM messages")[0] >= 2
        for needle in (TEXT, REPLY, PEER_NAME, PEER, OWNER[1:], "3EB0C0RE00000001",
                       TEXT[:12], REPLY[:12]):
            assert needle.encode() not in data, "%r found in the database files" % needle

    def test_raw_scan_finds_plaintext_when_encryption_is_disabled(self, make_bridge):
        # control for the test above: the scan does see plaintext when it is there
        h = make_bridge(start=False, environ={"WHATSIGNAL_ENABLE_ENCRYPTION": "false"}).start()
        round_trip(h)
        data = db_bytes(h.app.store.path)
        assert TEXT.encode() in data and PEER.encode() in data and REPLY.encode() in data


class TestKeyDerivation:
    """The scrypt parameters are recorded per database; databases from before the record keep opening."""

    LEGACY = (2 ** 15, 8, 1)

    @staticmethod
    def seal_v1(enc, mac, plaintext):
        """Format version 1 (what those releases wrote): 01 || nonce || ct || HMAC-SHA256(mac, head || ct)."""
        nonce = os.urandom(16)
        stream = b"".join(hashlib.blake2b(nonce + i.to_bytes(8, "big"), key=enc).digest()
                          for i in range((len(plaintext) + 63) // 64))
        head = b"\x01" + nonce
        ct = bytes(a ^ b for a, b in zip(plaintext, stream))
        return head + ct + hmac.new(mac, head + ct, hashlib.sha256).digest()

    def legacy_db(self, path, texts):
        """A database as releases before the "kdf" record wrote it: salt, key check, sealed rows."""
        s = ws.Store(str(path))
        try:
            salt = os.urandom(16)
            enc, mac, _ = expected_keys(ENC_SECRET, salt, *self.LEGACY)
            kcv = "enc1:" + hmac.new(mac, b"whatsignal key check", hashlib.sha256).hexdigest()[:24]
            with s.tx() as db:
                db.execute("INSERT INTO meta(key, value) VALUES ('salt', ?)", (salt.hex(),))
                db.execute("INSERT INTO meta(key, value) VALUES ('key_check', ?)", (kcv,))
                for i, text in enumerate(texts):
                    record = {"body": text, "_dedupe": "legacy%d" % i, "_chat": "c"}
                    body = self.seal_v1(enc, mac, json.dumps(record).encode())
                    db.execute("INSERT INTO queue(channel, direction, dedupe, chat, kind, body, next_at, created_at,"
                               " updated_at) VALUES ('default', 'w2s', ?, 'c', 'message', ?, 1, 1, 1)",
                               ("legacy%d" % i, body))
        finally:
            s.close()

    def test_a_database_without_the_record_opens_with_the_legacy_parameters(self, tmp_path):
        path = tmp_path / "legacy.db"
        self.legacy_db(path, ["before the upgrade", "second"])
        s = ws.Store(str(path))
        try:
            s.unlock(ENC_SECRET)
            assert s.kdf() == self.LEGACY and s.meta("kdf") is None
            assert [s.record_of(r)["body"] for r in s.pending("w2s")] == ["before the upgrade", "second"]
        finally:
            s.close()
        s = ws.Store(str(path))
        try:
            with pytest.raises(ws.CryptoError, match="does not open this database"):
                s.unlock("a-different-secret-" + "d" * 30)
        finally:
            s.close()
        ok, report = ws.verify(str(path), make_config(raw_config(tmp_path, "http://127.0.0.1:9", rpc_url="http://127.0.0.1:9")))
        assert ok and report["key"] == "opens", report

    def test_rotate_key_moves_a_legacy_database_to_the_current_parameters(self, tmp_path):
        path = tmp_path / "legacy.db"
        self.legacy_db(path, ["kept across the rotation"])
        s = ws.Store(str(path))
        try:
            s.unlock(ENC_SECRET)
            ws.rotate_key(s, ENC_SECRET, ENC_SECRET)      # same secret: only the derivation changes
            assert s.meta("kdf") == "scrypt n=%d r=%d p=%d" % (ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
        finally:
            s.close()
        s = ws.Store(str(path))
        try:
            s.unlock(ENC_SECRET)
            assert s.kdf() == (ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
            assert [s.record_of(r)["body"] for r in s.pending("w2s")] == ["kept across the rotation"]
            _, mac, _ = expected_keys(ENC_SECRET, s.salt(), ws.SCRYPT_N, ws.SCRYPT_R, ws.SCRYPT_P)
            assert s.meta("key_check") == "enc1:" + hmac.new(mac, b"whatsignal key check",
                                                             hashlib.sha256).hexdigest()[:24]
        finally:
            s.close()

    def test_an_unknown_derivation_is_refused_with_the_fix(self, tmp_path):
        s = ws.Store(str(tmp_path / "k.db"))
        try:
            s.unlock(ENC_SECRET)
            s.set_meta("kdf", "argon2id m=65536 t=3")
        finally:
            s.close()
        s = ws.Store(str(tmp_path / "k.db"))
        try:
            with pytest.raises(ws.CryptoError, match="unknown to this WhatSignal; run a newer release"):
                s.unlock(ENC_SECRET)
        finally:
            s.close()


# -- Store ----------------------------------------------------------------------------------------

@pytest.fixture
def fresh_store(tmp_path):
    s = ws.Store(str(tmp_path / "store.db"))
    s.unlock(ENC_SECRET)
    yield s
    s.close()


class TestStore:
    def test_wal_version_pragmas(self, fresh_store):
        other = sqlite3.connect(fresh_store.path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("PRAGMA user_version").fetchone()[0] == ws.SCHEMA_VERSION == len(ws.SCHEMA)
        finally:
            other.close()
        assert fresh_store.one("PRAGMA foreign_keys")[0] == 1
        assert fresh_store.one("PRAGMA busy_timeout")[0] >= 1000

    def test_reopen_is_idempotent(self, tmp_path):
        path = str(tmp_path / "r.db")
        s = ws.Store(path)
        s.unlock(ENC_SECRET)
        s.enqueue("default", "w2s", "d1", PEER_JID, "message", {"body": TEXT}, 1.0)
        schema = s.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        s.close()
        for _ in range(2):
            s = ws.Store(path)
            try:
                s.unlock(ENC_SECRET)
                assert s.one("PRAGMA user_version")[0] == ws.SCHEMA_VERSION
                assert [tuple(r) for r in s.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")] == \
                    [tuple(r) for r in schema]
                rows = s.pending("w2s")
                assert len(rows) == 1 and s.record_of(rows[0])["body"] == TEXT
            finally:
                s.close()

    def test_forward_migration_from_version_1(self, tmp_path):
        path = str(tmp_path / "v1.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript("BEGIN;" + ws.SCHEMA[0] + "PRAGMA user_version=1; COMMIT;")
        db.close()
        s = ws.Store(path)
        try:
            assert s.one("PRAGMA user_version")[0] == ws.SCHEMA_VERSION
            cols = [r[1] for r in s.query("PRAGMA table_info(messages)")]
            assert "sig_conv_enc" in cols
            assert s.one("SELECT name FROM sqlite_master WHERE name='signal_groups'") is not None
        finally:
            s.close()

    def test_newer_schema_is_refused(self, tmp_path):
        path = str(tmp_path / "new.db")
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version=%d" % (ws.SCHEMA_VERSION + 5))
        db.commit()
        db.close()
        with pytest.raises(ws.ConfigError) as e:
            ws.Store(path)
        assert "newer" in str(e.value)

    def test_upgrade_to_schema_6_keeps_the_queue_and_indexes_only_what_each_index_serves(self, tmp_path):
        path = str(tmp_path / "v5.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        for v in range(5):
            db.executescript("BEGIN;" + ws.SCHEMA[v] + "PRAGMA user_version=%d; COMMIT;" % (v + 1))
        for i, state in enumerate(("pending", "done", "dead", "muted", "pending")):
            db.execute("INSERT INTO queue(channel, direction, dedupe, chat, kind, body, state, next_at, created_at,"
                       " updated_at) VALUES ('default', 'w2s', ?, 'c', 'message', x'00', ?, 1, 1, ?)",
                       ("d%d" % i, state, 10.0 + i))
        db.close()
        s = ws.Store(path)
        try:
            assert s.one("PRAGMA user_version")[0] == 6
            indexes = {r[0]: r[1] for r in s.query("SELECT name, sql FROM sqlite_master WHERE type='index'"
                                                    " AND tbl_name='queue' AND sql IS NOT NULL")}
            assert sorted(indexes) == ["queue_dedupe_channel", "queue_ended", "queue_pending_only"]
            assert "WHERE state='pending'" in indexes["queue_pending_only"]
            assert ws.ENDED in indexes["queue_ended"]
            assert [r["dedupe"] for r in s.pending("w2s")] == ["d0", "d4"]
            assert s.queue_depth("w2s") == 2
            assert s.one("SELECT COUNT(*) FROM queue INDEXED BY queue_ended WHERE " + ws.ENDED)[0] == 3
        finally:
            s.close()

    def test_no_statement_on_the_queue_reads_the_whole_table(self, tmp_path):
        """Every query the delivery, retention, dead-letter and hold paths run on the queue goes through an index.

        The statements are those the store really runs (traced), each planned with SQLite's own EXPLAIN QUERY PLAN.
        """
        config = make_config(offline_raw(tmp_path, retentionDays=30))
        store = open_store(tmp_path / "whatsignal.db")
        seen = []
        try:
            for i in range(3):
                assert store.enqueue("default", "w2s", "dedupe-%d" % i, KLARA, "message", {"id": i}, T0 - 40 * DAY)
            first = store.pending("w2s")[0]["id"]
            store.db.set_trace_callback(seen.append)
            store.pending("w2s", after=first)
            store.queue_depth("w2s")
            store.finish(first, "dead", T0 - 40 * DAY, error="x")
            store.finish(first + 1, "done", T0 - 40 * DAY)
            store.release_held("default", KLARA, T0)
            assert ws.outbox(store, T0)["dead"][0]["id"] == first
            assert ws.outbox(store, T0, retry="all") == {"requeued": 1}
            assert ws.cleanup(store, config, T0)["queue"] == 1
            store.db.set_trace_callback(None)
            statements = {q for q in seen if re.search(r"\b(FROM|UPDATE|INTO) queue\b", q) and
                          not q.lstrip().upper().startswith("INSERT")}
            assert len(statements) >= 7, statements
            for q in statements:
                plan = [r[3] for r in store.db.execute("EXPLAIN QUERY PLAN " + q, (None,) * q.count("?"))]
                # by row id, by a whole dedupe key, or through the index of the state asked for; never by channel
                # alone (every item the channel ever had) nor the whole table
                wide = [p for p in plan if re.search(r"\bqueue\b", p) and not re.search(
                    r"INTEGER PRIMARY KEY|queue_pending_only|queue_ended|dedupe=\?", p)]
                assert wide == [], (q, plan)
        finally:
            store.db.set_trace_callback(None)
            store.close()

    def test_enqueue_dedupe(self, fresh_store):
        s = fresh_store
        assert s.enqueue("default", "w2s", "m:x:1", PEER_JID, "message", {"n": 1}, 1.0) is True
        assert s.enqueue("default", "w2s", "m:x:1", PEER_JID, "message", {"n": 2}, 2.0) is False
        assert s.enqueue("default", "s2w", "m:x:1", "~owner", "text", {"n": 3}, 3.0) is True
        assert s.enqueue("default", "w2s", "m:x:2", PEER_JID, "message", {"n": 4}, 4.0) is True
        rows = s.pending("w2s")
        assert [s.record_of(r)["n"] for r in rows] == [1, 4]
        assert all(re.fullmatch(r"[0-9a-f]{32}", r["dedupe"]) and re.fullmatch(r"[0-9a-f]{32}", r["chat"])
                   for r in rows), "lookup tokens, never the ids themselves"

    def test_concurrent_enqueue_loses_nothing(self, fresh_store, tmp_path):
        second = ws.Store(fresh_store.path)      # a second connection, like a second process
        second.unlock(ENC_SECRET)
        results, errors = [], []

        def worker(store, t):
            try:
                for i in range(40):
                    results.append(store.enqueue("default", "w2s", "u:%d:%d" % (t, i), "c%d" % (i % 3), "message",
                                                 {"t": t, "i": i}, time.time()))
                    # every thread also races on the same 10 ids
                    results.append(("dup", store.enqueue("default", "w2s", "same:%d" % (i % 10), "c", "message",
                                                         {}, time.time())))
            except Exception as e:   # pragma: no cover - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(fresh_store if t % 2 else second, t)) for t in range(8)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads)
            assert errors == []
            assert sum(1 for r in results if r is True) == 8 * 40
            assert sum(1 for r in results if isinstance(r, tuple) and r[1] is True) == 10
            assert fresh_store.one("SELECT COUNT(*) FROM queue")[0] == 8 * 40 + 10
            got = {(rec["t"], rec["i"]) for rec in (fresh_store.record_of(r) for r in fresh_store.pending("w2s", 10000))
                   if "t" in rec}
            assert got == {(t, i) for t in range(8) for i in range(40)}
        finally:
            second.close()


def committed_texts(store, after=0):
    """(largest id, bodies) of the queue rows committed in *store*'s file, read over a connection of its own."""
    db = sqlite3.connect(store.path, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM queue WHERE id > ? ORDER BY id", (after,)).fetchall()
    finally:
        db.close()
    return (rows[-1]["id"] if rows else after), [store.open_row(r, "queue", "body") for r in rows]


class TestGroupCommit:
    def test_each_enqueue_returns_after_its_row_is_committed(self, fresh_store):
        problems, done = [], []

        def worker(t):
            seen, last = set(), 0
            for i in range(30):
                text = "t%d-i%d" % (t, i)
                if not fresh_store.enqueue("default", "w2s", "gc:%s" % text, "c%d" % t, "message", {"x": text},
                                          time.time()):
                    problems.append("not new: " + text)
                last, texts = committed_texts(fresh_store, last)
                seen.update(json.loads(x)["x"] for x in texts)
                if text not in seen:
                    problems.append("answered before committed: " + text)
            done.append(t)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(done) == list(range(8)) and problems == []
        assert fresh_store.one("SELECT COUNT(*) FROM queue")[0] == 240

    @pytest.mark.parametrize("size", [2, 7, ws.ENQUEUE_MANY, ws.ENQUEUE_MANY + 1])
    def test_a_batch_says_for_each_row_whether_it_was_new(self, fresh_store, size):
        """One multi-row statement (up to ENQUEUE_MANY rows; more go row by row in one transaction)."""
        s = fresh_store
        assert s.enqueue("default", "w2s", "seen-before", "c", "message", {"n": -1}, 1.0)
        rows, expected, sent = [], [], set()
        for i in range(size):
            dedupe = ("seen-before" if i % 3 == 1 else          # there already
                      "twice-%d" % (i // 4) if i % 3 == 2 else  # twice (or more) in this batch: new once
                      "new-%d" % i)
            key = s.tok("dedupe", dedupe)
            rows.append(("default", "w2s", key, s.tok("chat", "c"), "message",
                         s.seal(json.dumps({"n": i}), "queue", "body", "default", "w2s", key), 2.0, 2.0, 2.0))
            expected.append(dedupe != "seen-before" and dedupe not in sent)
            sent.add(dedupe)
        assert s._enqueue_rows(rows) == expected
        stored = sorted(s.record_of(r)["n"] for r in s.pending("w2s", 10000))
        assert stored == [-1] + [i for i in range(size) if expected[i]]
        assert s._enqueue_rows(rows) == [False] * size             # all of them there now
        other = [("work",) + row[1:] for row in rows[:2]]          # the same keys in another channel are new
        assert s._enqueue_rows(other) == [True, rows[1][2] != rows[0][2]]

    def test_a_failing_batch_fails_every_waiter_of_it_and_passes_the_lead_on(self):
        batches, written = [], []
        first_in, release = threading.Event(), threading.Event()

        def commit_many(items):
            batches.append(list(items))
            if len(batches) == 1:
                first_in.set()
                assert release.wait(10)
            if "bad" in items:
                raise ws.StoreError("database write failed: disk I/O error")
            written.extend(items)
            return [item.upper() for item in items]

        gc = ws.GroupCommit(commit_many)
        outcome = {}

        def submit(item):
            try:
                outcome[item] = gc.submit(item)
            except ws.StoreError as e:
                outcome[item] = "error: %s" % e

        leader = threading.Thread(target=submit, args=("a",))
        leader.start()
        assert first_in.wait(10)
        followers = [threading.Thread(target=submit, args=(x,)) for x in ("b", "c", "bad", "d")]
        for t in followers:
            t.start()
        assert eventually(lambda: len(gc.queue) == 4)     # all four wait behind the running commit
        release.set()
        for t in [leader] + followers:
            t.join(10)
        assert outcome["a"] == "A"
        assert batches[0] == ["a"] and sorted(batches[1]) == ["b", "bad", "c", "d"] and len(batches) == 2
        for x in ("b", "c", "bad", "d"):    # one transaction: all of it failed, and every waiter was told
            assert outcome[x] == "error: database write failed: disk I/O error"
        assert written == ["a"]
        assert gc.submit("e") == "E" and batches[-1] == ["e"]     # the lead was handed back after the failure

    def test_a_failing_commit_fails_every_waiter_and_loses_nothing(self, fresh_store):
        fault = sqlite3.connect(fresh_store.path)
        fault.execute("CREATE TRIGGER fail_writes BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        fault.commit()
        results = {}

        def worker(t):
            try:
                results[t] = fresh_store.enqueue("default", "w2s", "fail:%d" % t, "c", "message", {"t": t}, time.time())
            except ws.StoreError as e:
                results[t] = str(e)

        try:
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert all("disk full" in str(results[t]) for t in range(8)), results
            assert fresh_store.one("SELECT COUNT(*) FROM queue")[0] == 0
            fault.execute("DROP TRIGGER fail_writes")
            fault.commit()
            # the sender retries (WAHA does, after a 503): each item is stored exactly once
            assert [fresh_store.enqueue("default", "w2s", "fail:%d" % t, "c", "message", {"t": t}, time.time())
                    for t in range(8)] == [True] * 8
            assert fresh_store.one("SELECT COUNT(*) FROM queue")[0] == 8
        finally:
            fault.close()


# -- HTTP server ----------------------------------------------------------------------------------

class TestHttpServer:
    def test_signed_webhook_is_stored_and_delivered(self, bridge):
        h = bridge
        status, headers, body, _ = post_signed(h, wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}))
        assert status == 200 and json.loads(body) == {"status": "stored"}
        assert headers["content-type"] == "application/json"
        assert eventually(lambda: h.texts())
        assert h.texts() == ["%s: %s" % (PEER_SHOWN, TEXT)]
        assert queue_count(h) == 1
        # the same event again (WAHA retry): acknowledged, not delivered twice
        assert h.webhook(wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME})) == (200, {"status": "duplicate"})
        assert queue_count(h) == 1

    def test_unsigned_webhook_is_refused(self, bridge):
        h = bridge
        assert h.webhook(wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}), secret=None) == (401, {"error": "authentication failed"})
        assert queue_count(h) == 0
        warns = [r for r in h.logs.records() if r["level"] == "WARN" and "authentication failed" in r["msg"]]
        assert len(warns) == 1
        # a signed message from the same chat after it: once it arrived, the refused one never will
        assert h.webhook(wa_message(PEER_JID, "3EB0C0RE00000002", "marker", _data={"notifyName": PEER_NAME}))[0] == 200
        assert eventually(lambda: h.texts())
        assert h.texts() == ["%s: marker" % PEER_SHOWN]

    def test_wrong_signature_and_wrong_algorithm(self, bridge):
        h = bridge
        ev = wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME})
        assert h.webhook(ev, secret="not-the-secret-" + "n" * 30)[0] == 401
        body = json.dumps(ev).encode()
        good = FakeWaha.sign(body, WEBHOOK_SECRET)
        status, _, _, _ = http_request(h.url, "POST", "/webhook/whatsapp", body, {
            "Content-Type": "application/json", "X-Webhook-Hmac": good, "X-Webhook-Hmac-Algorithm": "sha256"})
        assert status == 401
        status, _, _, _ = http_request(h.url, "POST", "/webhook/whatsapp", body + b" ", {
            "Content-Type": "application/json", "X-Webhook-Hmac": good, "X-Webhook-Hmac-Algorithm": "sha512"})
        assert status == 401, "the signature covers the exact body bytes"
        assert queue_count(h) == 0
        # the correctly signed body is fine
        assert post_signed(h, body)[0] == 200
        assert queue_count(h) == 1

    def test_non_json_content_type_is_415(self, bridge):
        h = bridge
        status, _, body, _ = post_signed(h, wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}), **{"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in json.loads(body)["error"]
        assert post_signed(h, wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}), **{"Content-Type": "application/json; charset=utf-8"})[0] \
            == 200
        assert queue_count(h) == 1

    def test_body_over_limit_is_413_without_reading_it(self, make_bridge):
        h = make_bridge(start=False, raw_overrides={"server": {"maxBodyMB": 1}}).start()
        host, port = bridge_addr(h)
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"POST /webhook/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nX-Webhook-Hmac: 00\r\nX-Webhook-Hmac-Algorithm: sha512\r\n\r\n"
                      % (1024 * 1024 + 1))
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}\n"):
                chunk = s.recv(4096)   # answered although no body byte was sent
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 413 "), data[:100]
        assert b"connection: close" in data.lower()
        # just under the limit is accepted (an ignored event padded with a big field)
        ev = fixture("waha-presence-update.json")
        ev["padding"] = "p" * (1024 * 1024 - 1000)
        status, _, body, _ = post_signed(h, ev)
        assert (status, json.loads(body)) == (200, {"status": "ignored"})

    def test_default_body_limit_is_10_mb(self, bridge):
        h = bridge
        status, _, _, _ = http_request(h.url, "POST", "/webhook/whatsapp", b"", {
            "Content-Type": "application/json", "Content-Length": str(10 * 1024 * 1024 + 1)})
        assert status == 413
        ev = fixture("waha-presence-update.json")
        ev["padding"] = "p" * (10 * 1024 * 1024 - 1000)
        assert post_signed(h, ev)[::3] == (200, {"status": "ignored"})

    def test_malformed_json_is_400(self, bridge):
        h = bridge
        status, _, body, _ = post_signed(h, b'{"event": "message", "session": ')
        assert status == 400 and json.loads(body) == {"error": "malformed JSON"}
        assert queue_count(h) == 0

    @pytest.mark.parametrize("body", [
        b"[]", b'"message"', b"null",
        b'{"event":"message","session":"default","payload":"not an object"}',
        b'{"event":"message","session":"default","payload":{"from":"4915123456789@c.us","body":"x"}}',
        b'{"event":5,"session":"default","payload":{}}',
    ], ids=["array", "string", "null", "payload-string", "message-without-id", "event-number"])
    def test_wrong_shape_is_400(self, bridge, body):
        status, _, resp, _ = post_signed(bridge, body)
        assert status == 400, resp
        assert "error" in json.loads(resp)
        assert queue_count(bridge) == 0

    def test_unhandled_event_is_200_ignored(self, bridge):
        h = bridge
        assert h.webhook(fixture("waha-presence-update.json")) == (200, {"status": "ignored"})
        assert queue_count(h) == 0

    def test_malformed_payloads_get_400_with_a_reason(self, bridge):
        h = bridge
        bodies = [b"[" * 100000, b"\xff\xfe\x00garbage", b"{}", b'{"event":"message","session":"' + b"s" * 500 + b'"}',
                  json.dumps({"event": "message", "session": "default", "payload": {
                      "id": {"_serialized": 5}, "from": ["x"], "body": {"a": 1}}}).encode(),
                  json.dumps({"event": "message", "session": "default", "payload": {
                      "id": "false_4915123456789@c.us_AAA", "from": "4915123456789@c.us", "body": 5,
                      "hasMedia": "yes", "media": {"url": 5}, "timestamp": "x"}}).encode(),
                  json.dumps({"event": "message.reaction", "session": "default", "payload": {
                      "id": "x", "reaction": {"messageId": {"a": 1}, "text": 7}}}).encode(),
                  json.dumps({"event": "message.ack", "session": "default", "payload": {"ack": "x", "id": None}}).encode(),
                  json.dumps({"event": "session.status", "session": "default", "payload": {"status": 5}}).encode(),
                  json.dumps({"event": "message.revoked", "session": "default", "payload": []}).encode(),
                  json.dumps({"event": "message.edited", "session": "default", "payload": {"id": 1}}).encode()]
        for body in bodies:
            status, _, resp, js = post_signed(h, body)
            assert status == 400, (status, body[:80], resp)
            assert js["error"].startswith(("malformed JSON", "invalid payload: ")), js
        assert queue_count(h) == 0
        assert http_request(h.url, "GET", "/healthz")[0] == 200
        assert not [r for r in h.logs.records() if r["level"] == "ERROR"], h.logs.text()

    def test_database_locked_gives_503_then_recovers(self, bridge):
        h = bridge
        with h.app.store.lock:
            h.app.store.db.execute("PRAGMA busy_timeout=100")
        blocker = sqlite3.connect(h.app.store.path, isolation_level=None, timeout=5)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            status, headers, body, _ = post_signed(h, wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}))
            assert status == 503, body
            assert headers.get("retry-after", "").isdigit()
            assert "retry" in json.loads(body)["error"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert [r for r in h.logs.records() if r["level"] == "ERROR" and "503" in r["msg"]]
        status, _, body, _ = post_signed(h, wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}))
        assert (status, json.loads(body)) == (200, {"status": "stored"}), "the 503 event was not stored"
        assert eventually(lambda: h.texts())
        assert h.texts() == ["%s: %s" % (PEER_SHOWN, TEXT)]

    def test_failed_signatures_are_throttled_but_signed_traffic_is_not(self, bridge):
        h = bridge
        host, port = bridge_addr(h)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            statuses = []
            for i in range(ws.AUTH_FAIL_LIMIT + 5):
                st, hd, _, _ = post_signed(h, wa_message(PEER_JID, "BAD%04d" % i, TEXT, _data={"notifyName": PEER_NAME}), conn=conn,
                                             secret="wrong-secret-" + "w" * 30)
                statuses.append((st, hd.get("retry-after")))
            assert [s for s, _ in statuses[:ws.AUTH_FAIL_LIMIT]] == [401] * ws.AUTH_FAIL_LIMIT
            assert all(s == 429 and ra and int(ra) > 0 for s, ra in statuses[ws.AUTH_FAIL_LIMIT:]), statuses
            # correctly signed requests from the same client, in a burst, all pass
            for i in range(30):
                st, _, body, _ = post_signed(h, wa_message(PEER_JID, "OK%04d" % i, "burst %d" % i, _data={"notifyName": PEER_NAME}),
                                               conn=conn)
                assert (st, json.loads(body)) == (200, {"status": "stored"})
        finally:
            conn.close()
        assert queue_count(h) == 30

    def test_keep_alive_many_requests_one_connection(self, bridge):
        h = bridge
        host, port = bridge_addr(h)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            assert http_request(h.url, "GET", "/healthz", conn=conn)[0] == 200
            sock = conn.sock
            for i in range(40):
                if i % 4 == 0:
                    st, hd, _, _ = post_signed(h, wa_message(PEER_JID, "KA%04d" % i, "k %d" % i, _data={"notifyName": PEER_NAME}),
                                                 conn=conn)
                else:
                    st, hd, _, _ = http_request(h.url, "GET", "/healthz", conn=conn)
                assert st == 200 and hd.get("connection", "").lower() != "close"
                assert conn.sock is sock, "the connection was not kept alive (request %d)" % i
        finally:
            conn.close()
        assert queue_count(h) == 10

    def test_tcp_nodelay_on_accepted_sockets(self, bridge):
        h = bridge
        host, port = bridge_addr(h)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            assert http_request(h.url, "GET", "/healthz", conn=conn)[0] == 200
            with h.app.server.conn_lock:
                socks = list(h.app.server.connections)
            assert socks, "the open keep-alive connection is tracked"
            assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
            assert h.app.server.request_queue_size >= 128, "a burst of WAHA connections is not refused"
        finally:
            conn.close()

    def test_idle_and_slow_clients_are_cut_off(self, bridge, monkeypatch):
        h = bridge
        monkeypatch.setattr(ws.Handler, "timeout", 0.5)
        host, port = bridge_addr(h)
        with socket.create_connection((host, port), timeout=5) as idle:
            assert idle.recv(100) == b""          # closed by the server (before the 5 s socket timeout), nothing sent
        with socket.create_connection((host, port), timeout=5) as slow:
            slow.sendall(b"POST /webhook/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n0123456789")
            data = b""
            while True:
                chunk = slow.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert not data.startswith(b"HTTP/1.1 500"), "a slow client is not an internal error: %r" % data[:60]
        assert not [r for r in h.logs.records() if r["level"] == "ERROR"], h.logs.text()

    def test_unknown_paths_are_404(self, bridge):
        assert http_request(bridge.url, "GET", "/nope")[0] == 404
        assert http_request(bridge.url, "POST", "/webhook/other", b"{}", {"Content-Type": "application/json"})[0] == 404


class TestIntakeFirst:
    """Delivery gives way to webhooks in flight, for a bounded time an item."""

    def test_give_way_waits_while_webhooks_are_in_flight_and_never_longer_than_its_limit(self):
        now, slept, ends_at = [100.0], [], [None]
        intake = None

        def sleep(seconds):
            slept.append(seconds)
            now[0] += seconds
            if ends_at[0] is not None and now[0] >= ends_at[0] and intake.active:
                intake.__exit__(None, None, None)        # the webhook in flight is answered

        intake = ws.Intake(limit=0.02, step=0.002, sleep=sleep, monotonic=lambda: now[0])
        stopping = threading.Event()
        intake.give_way(stopping)
        assert slept == []                                 # nothing in flight: no wait at all
        with intake:
            assert intake.active == 1
            intake.give_way(stopping)                      # a webhook that does not end: the limit
            assert abs(sum(slept) - 0.02) < 0.0021 and intake.active == 1
            stopping.set()
            slept.clear()
            intake.give_way(stopping)                      # stopping: no wait
            assert slept == []
        assert intake.active == 0
        stopping.clear()
        intake.__enter__()
        ends_at[0] = now[0] + 0.005
        intake.give_way(stopping)                          # waits until the webhook ends, not the whole limit
        assert intake.active == 0 and 0.004 <= sum(slept) <= 0.007

    def test_a_webhook_held_in_flight_by_a_slow_sender_does_not_stop_delivery(self, bridge):
        h = bridge
        body = body_of(wa_message(KLARA, "3EB0SLOWSENDER01", "slowly"))
        host, port = bridge_addr(h)
        slow = socket.create_connection((host, port), timeout=5)
        try:
            slow.sendall(raw_request("/webhook/whatsapp", body)[:-len(body) + 10])   # headers and 10 bytes of body
            assert eventually(lambda: h.app.bridge.intake.active == 1, 5)
            for i in range(5):
                post_event(h, wa_message(PEER_JID, "3EB0INFLIGHT%04d" % i, "meanwhile %d" % i))
            assert eventually(lambda: len([t for t in h.texts() if "meanwhile" in t]) == 5, 5), h.texts()
            assert h.app.bridge.intake.active == 1         # delivered while the slow one was still in flight
        finally:
            slow.close()
        assert eventually(lambda: h.app.bridge.intake.active == 0, 10)


class TestIngestCommit:
    """Webhooks arriving together are committed together; each is answered only after its commit."""

    def post_many(self, h, texts, threads=8):
        """Post one signed message per text from *threads* connections; return {text: (status, body)}."""
        out, lock = {}, threading.Lock()
        chunks = [texts[i::threads] for i in range(threads)]

        def run(chunk, check):
            host, port = bridge_addr(h)
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                for text in chunk:
                    ev = wa_message(PEER_JID, "3EB0" + hashlib.sha1(text.encode()).hexdigest()[:12].upper(), text, _data={"notifyName": PEER_NAME})
                    status, _, _, answer = post_signed(h, ev, conn=conn)
                    extra = check(text) if status == 200 and check else None
                    with lock:
                        out[text] = (status, answer, extra)
            finally:
                conn.close()
        return out, chunks, run

    def test_every_webhook_is_committed_when_it_is_answered(self, bridge):
        h = bridge
        texts = ["group commit %d" % i for i in range(160)]
        out, chunks, run = self.post_many(h, texts)
        local = threading.local()

        def committed(text):
            last, found = committed_texts(h.app.store, getattr(local, "last", 0))
            local.last = last
            local.seen = getattr(local, "seen", set()) | {t for t in texts if any(t in f for f in found)}
            return text in local.seen

        threads = [threading.Thread(target=run, args=(c, committed)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(out) == sorted(texts)
        assert all(v == (200, {"status": "stored"}, True) for v in out.values()), \
            [k for k, v in out.items() if v != (200, {"status": "stored"}, True)][:5]
        assert eventually(lambda: len(h.texts()) == 160, 30)
        assert sorted(h.texts()) == sorted("%s: %s" % (PEER_SHOWN, t) for t in texts)

    def test_a_failing_commit_answers_503_to_every_waiter_and_loses_nothing(self, bridge):
        h = bridge
        fault = sqlite3.connect(h.app.store.path)
        fault.execute("CREATE TRIGGER fail_writes BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        fault.commit()
        try:
            texts = ["refused %d" % i for i in range(40)]
            out, chunks, run = self.post_many(h, texts)
            threads = [threading.Thread(target=run, args=(c, None)) for c in chunks]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(out) == sorted(texts)
            assert {v[0] for v in out.values()} == {503}
            assert all(v[1] == {"error": "storage unavailable, retry later"} for v in out.values())
            assert queue_count(h) == 0
            assert any("webhook not stored" in r["msg"] for r in h.logs.records())
            fault.execute("DROP TRIGGER fail_writes")
            fault.commit()
            out, chunks, run = self.post_many(h, texts)       # WAHA retries
            threads = [threading.Thread(target=run, args=(c, None)) for c in chunks]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(v[:2] == (200, {"status": "stored"}) for v in out.values())
            assert eventually(lambda: len(h.texts()) == 40, 30)
            assert sorted(h.texts()) == sorted("%s: %s" % (PEER_SHOWN, t) for t in texts)
        finally:
            fault.close()


# -- Health and metrics ---------------------------------------------------------------------------

class TestHealthAndMetrics:
    def test_healthz(self, bridge):
        assert http_request(bridge.url, "GET", "/healthz")[::3] == (200, {"status": "ok"})

    def test_health_shape(self, bridge):
        status, hd, _, rep = http_request(bridge.url, "GET", "/health")
        assert status == 200 and hd["content-type"] == "application/json"
        assert rep["status"] == "healthy"
        assert ISO_Z.match(rep["timestamp"]), rep["timestamp"]
        assert rep["version"] == ws.__version__ == "1.0.0"
        assert set(rep["checks"]) >= {"database", "whatsapp", "signal"}
        for name in ("database", "whatsapp", "signal"):
            check = rep["checks"][name]
            assert check["status"] == "ok"
            assert isinstance(check["latency_ms"], (int, float)) and check["latency_ms"] >= 0

    def test_health_degraded_when_waha_is_down(self, make_bridge):
        h = make_bridge(start=False).start()
        h.waha.stop()
        status, _, _, rep = http_request(h.url, "GET", "/health")
        assert status == 200
        assert rep["status"] == "degraded"
        assert rep["checks"]["whatsapp"]["status"] == "error" and rep["checks"]["whatsapp"].get("error")
        assert rep["checks"]["signal"]["status"] == "ok" and rep["checks"]["database"]["status"] == "ok"

    def test_health_degraded_when_signal_is_down(self, make_bridge):
        h = make_bridge(start=False).start()
        h.signal.stop()
        rep = http_request(h.url, "GET", "/health")[3]
        assert rep["status"] == "degraded" and rep["checks"]["signal"]["status"] == "error"

    def test_upstream_checks_are_cached(self, bridge):
        h = bridge
        for _ in range(5):
            assert http_request(h.url, "GET", "/health")[0] == 200
        assert len(h.waha.calls_for("/ping")) == 1
        assert len(h.signal.calls_for("/api/v1/check")) == 1

    def test_health_unhealthy_503_when_database_unusable(self, bridge):
        h = bridge
        with h.app.store.lock:
            h.app.store.db.close()
        status, _, _, rep = http_request(h.url, "GET", "/health")
        assert status == 503
        assert rep["status"] == "unhealthy" and rep["checks"]["database"]["status"] == "error"
        assert http_request(h.url, "GET", "/healthz")[0] == 200

    def test_metrics_fresh_process_lists_the_seed_metrics(self, bridge):
        status, hd, body, _ = http_request(bridge.url, "GET", "/metrics")
        assert status == 200
        assert hd["content-type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        missing = [n for n in ("whatsignal_messages_processed_total", "whatsignal_cleanup_duration_seconds",
                               "whatsignal_database_size_bytes", "whatsignal_media_files_count",
                               "whatsignal_build_info", "whatsignal_http_requests_total",
                               "whatsignal_webhook_auth_failures_total") if n not in text]
        assert missing == [], "a fresh bridge's /metrics lacks %s" % missing

    def test_metrics_after_traffic(self, bridge):
        h = bridge
        round_trip(h)
        assert h.webhook(wa_message(PEER_JID, "UNSIGNED1", TEXT, _data={"notifyName": PEER_NAME}), secret=None)[0] == 401
        assert http_request(h.url, "GET", "/healthz")[0] == 200
        ws.run_cleanup(h.app)
        text = http_request(h.url, "GET", "/metrics")[2].decode()
        assert metric_value(text, "whatsignal_build_info", version=ws.__version__) == 1.0
        assert metric_value(text, "whatsignal_messages_processed_total", direction="w2s", kind="text",
                                 result="ok") == 1.0
        assert metric_value(text, "whatsignal_webhook_auth_failures_total") == 1.0
        assert metric_value(text, "whatsignal_http_requests_total", path="/webhook/whatsapp", status="200") == 1.0
        assert metric_value(text, "whatsignal_http_requests_total", path="/webhook/whatsapp", status="401") == 1.0
        assert metric_value(text, "whatsignal_http_requests_total", path="/healthz", status="200") == 1.0
        assert metric_value(text, "whatsignal_database_size_bytes") == float(h.app.store.size_bytes()) > 0
        assert metric_value(text, "whatsignal_media_files_count") is not None
        assert metric_value(text, "whatsignal_cleanup_duration_seconds") >= 0
        assert "# TYPE whatsignal_messages_processed_total counter" in text
        assert [r for r in h.logs.records() if r["msg"] == "Successfully completed cleanup"]
        for line in text.splitlines():
            assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+$", line), line

    def test_metrics_token(self, make_bridge):
        token = "metrics-token-" + "t" * 20
        h = make_bridge(start=False, raw_overrides={"server": {"metricsToken": token}}).start()
        status, hd, _, _ = http_request(h.url, "GET", "/metrics")
        assert status == 401 and hd.get("www-authenticate") == "Bearer"
        assert http_request(h.url, "GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http_request(h.url, "GET", "/metrics", headers={"Authorization": token})[0] == 401
        status, _, body, _ = http_request(h.url, "GET", "/metrics", headers={"Authorization": "Bearer " + token})
        assert status == 200 and b"whatsignal_build_info" in body
        assert token not in h.logs.text()


# -- Logging --------------------------------------------------------------------------------------

class TestLogging:
    def test_json_lines_with_ts_level_msg(self, bridge):
        h = bridge
        round_trip(h)
        h.webhook(wa_message(PEER_JID, "3EB0C0RE00000001", TEXT, _data={"notifyName": PEER_NAME}), secret=None)
        lines = [l for l in h.logs.text().splitlines() if l.strip()]
        assert len(lines) >= 4
        for line in lines:
            rec = json.loads(line)
            assert list(rec)[:3] == ["ts", "level", "msg"], rec
            assert LOG_TS.match(rec["ts"]), rec["ts"]
            assert rec["level"] in ("DEBUG", "INFO", "WARN", "ERROR")
            assert isinstance(rec["msg"], str) and rec["msg"]
        assert any("processing time" in r["msg"] for r in h.logs.records())

    def test_log_level_honoured(self):
        for level, shown in (("debug", ["DEBUG", "INFO", "WARN", "ERROR"]), ("info", ["INFO", "WARN", "ERROR"]),
                             ("warn", ["WARN", "ERROR"]), ("error", ["ERROR"])):
            stream = LogCapture()
            log = ws.Log(level, stream=stream, clock=lambda: 1767225600.25)
            log.debug("d")
            log.info("i")
            log.warn("w", n=1)
            log.error("e")
            recs = stream.records()
            assert [r["level"] for r in recs] == shown
            assert recs[0]["ts"] == "2026-01-01T00:00:00.250Z"
        stream = LogCapture()
        ws.Log("warn", stream=stream).warn("x", count=3, who="+4915******89")
        assert stream.records() == [{"ts": stream.records()[0]["ts"], "level": "WARN", "msg": "x", "count": 3,
                                     "who": "+4915******89"}]

    def test_round_trip_at_debug_leaks_nothing(self, bridge):
        h = bridge
        round_trip(h)
        stranger = owner_env(int(time.time() * 1000) + 5, "let me in zorkmid-5521")
        stranger["envelope"].update(source=NOT_OWNER, sourceNumber=NOT_OWNER,
                                    sourceUuid="0f0e0d0c-0b0a-4908-8706-050403020100", sourceName="Mallory")
        h.signal.push(stranger)
        assert eventually(lambda: any(r["msg"] == "unauthorized sender ignored" for r in h.logs.records()))
        rec = next(r for r in h.logs.records() if r["msg"] == "unauthorized sender ignored")
        assert rec["level"] == "WARN" and rec["sender"] == "+1555*****99"
        h.webhook(wa_message(PEER_JID, "FORGED1", "forged " + TEXT, _data={"notifyName": PEER_NAME}), secret="x" * 40)
        post_signed(h, b'{"event": "message", "body": "' + TEXT.encode() + b'"')
        h.webhook(wa_message("4917612345678" + "@c.us", "OTHER1", "ignored " + TEXT, _data={"notifyName": PEER_NAME}),
                  headers={"X-Webhook-Hmac-Algorithm": "sha1"})
        text = h.logs.text()
        assert "authentication failed" in text
        cipher = h.app.store.cipher
        for leak in (TEXT, REPLY, "zorkmid-5521", PEER, "4917612345678", OWNER[1:], BRIDGE[1:],
                     NOT_OWNER[1:], WEBHOOK_SECRET, ENC_SECRET, WAHA_KEY, "x" * 40,
                     cipher.enc_key.hex(), cipher.mac_key.hex(), cipher.lookup_key.hex()):
            assert leak not in text, "%r reached the log" % leak
        for full in re.findall(r"\d{7,}", text):
            pytest.fail("a long digit run (phone number?) reached the log: %s" % full)


# -- Command line ---------------------------------------------------------------------------------

CLI_COMMANDS = ("serve", "check-config", "outbox", "cleanup", "backup", "verify", "restore", "rotate-key",
                 "stats", "demo", "bench")


class TestCommandLine:
    def test_version(self, capsys):
        with pytest.raises(SystemExit) as e:
            ws.main(["--version"], {})
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == "WhatSignal " + ws.__version__

    def test_help_lists_every_command(self, capsys):
        with pytest.raises(SystemExit) as e:
            ws.main(["--help"], {})
        assert e.value.code == 0
        out = capsys.readouterr().out
        for cmd in CLI_COMMANDS:
            assert re.search(r"^\s+%s\s+\S" % re.escape(cmd), out, re.M), "%s missing from --help" % cmd
        assert "--config" in out

    def test_missing_config_file_subprocess(self, tmp_path):
        missing = str(tmp_path / "nope" / "config.json")
        for argv in (["--config", missing, "check-config"], ["--config", missing]):
            p = subprocess.run([sys.executable, WS_PATH] + argv, cwd=str(tmp_path), env=clean_env(),
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 2, p.stderr
            assert "Traceback" not in p.stderr
            lines = error_lines(p.stderr)
            assert len(lines) == 1 and "not found" in lines[0] and missing in lines[0], p.stderr
            assert p.stdout == ""

    def test_serve_subprocess_health_webhook_and_sigterm(self, tmp_path, upstream_fakes):
        """No command is serve; the webhook secret comes from the environment; SIGTERM stops it cleanly."""
        waha, sig = upstream_fakes
        raw = raw_config(tmp_path, waha.url, rpc_url=sig.url)
        raw["whatsapp"]["webhookSecret"] = "env:WEBHOOK_SECRET"
        proc = BridgeProcess(tmp_path, raw, environ={"WEBHOOK_SECRET": WEBHOOK_SECRET}, command=())
        try:
            proc.start(timeout=20)
            assert http_request(proc.url, "GET", "/healthz", timeout=2)[::3] == (200, {"status": "ok"})
            ev = waha.event("message", {"id": "false_%s_SUBPROC1" % PEER_JID, "timestamp": int(time.time()),
                                        "from": PEER_JID, "fromMe": False, "body": TEXT,
                                        "hasMedia": False, "_data": {"notifyName": PEER_NAME}})
            assert waha.webhook(proc.url + "/webhook/whatsapp", ev, WEBHOOK_SECRET) == (200, {"status": "stored"})
            assert waha.webhook(proc.url + "/webhook/whatsapp", ev, None)[0] == 401
            assert sig.wait_for(lambda f: f.sent("send"), 10)
            assert sig.sent("send")[0]["message"] == "%s: %s" % (PEER_SHOWN, TEXT)
            assert proc.terminate() == 0
        finally:
            proc.stop()
        log_text = proc.log_tail(1 << 24)
        assert "Traceback" not in log_text
        recs = [json.loads(l) for l in log_text.splitlines() if l.strip()]
        msgs = [r["msg"] for r in recs]
        assert "WhatSignal started" in msgs and msgs[-1] == "WhatSignal stopped"
        assert not [r for r in recs if r["level"] == "DEBUG"], "logLevel info shows no debug lines"
        assert any(r["level"] == "WARN" and "authentication failed" in r["msg"] for r in recs)
        assert TEXT not in log_text and PEER not in log_text

    def test_stats_prints_counts_without_decrypting(self, capsys, tmp_path):
        raw = offline_raw(tmp_path)
        s = ws.Store(raw["database"]["path"])
        s.unlock(ENC_SECRET)
        s.enqueue("default", "w2s", "d1", PEER_JID, "message", {"body": TEXT}, time.time())
        s.close()
        rc, out, err = run_main(capsys, ["--config", write_config(tmp_path, raw), "stats"], bridge_env())
        assert rc == 0, err
        rep = json.loads(out)
        assert rep["queue"]["w2s"]["pending"] == 1 and rep["tables"]["queue"] == 1
        assert TEXT not in out and PEER not in out


# -- Misc -----------------------------------------------------------------------------------------

def product_source():
    with open(WS_PATH, encoding="utf-8") as f:
        return f.read()


class TestMisc:
    def test_every_config_key_and_command_is_documented_in_the_readme(self):
        readme = open(os.path.join(os.path.dirname(os.path.abspath(ws.__file__)), "README.md"), encoding="utf-8").read()
        missing = [k for k in ws.DEFAULTS if "`%s`" % k not in readme]
        assert missing == [], "README's configuration table lacks %s" % missing
        for env in list(ws.ENV_OVERRIDES) + ["WEBHOOK_SECRET", "WHATSIGNAL_ENABLE_ENCRYPTION",
                                             "WHATSIGNAL_ENCRYPTION_SECRET", "WHATSIGNAL_ENCRYPTION_SECRET_OLD"]:
            assert env in readme, env
        for name, _ in ws.COMMANDS:
            assert name in readme, name
        assert "python3 -m pytest -q test_whatsignal.py" in readme
        ci = open(os.path.join(os.path.dirname(os.path.abspath(ws.__file__)), ".ci", "run"), encoding="utf-8").read()
        assert "-m pytest -q test_whatsignal.py" in ci

    def test_standard_library_only(self):
        if not hasattr(sys, "stdlib_module_names"):
            pytest.skip("sys.stdlib_module_names arrived in Python 3.10; the check runs there")
        tree = ast.parse(product_source())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, "no relative imports"
                names.add(node.module.split(".")[0])
        assert names, "imports were found"
        assert sorted(n for n in names if n not in sys.stdlib_module_names) == []

    def test_parses_as_python_3_9(self):
        tree = ast.parse(product_source(), feature_version=(3, 9))     # a SyntaxError for any 3.10+ syntax
        assert {"main", "App", "Store"} <= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    @staticmethod
    def outline():
        src = product_source()
        banners = re.findall(r"^# (.+?) #{3,}$", src, re.M)
        doc = ast.get_docstring(ast.parse(src))
        listed = re.search(r"Sections \(grep[^\n]*\n(.*?)\n\s*\n", doc, re.S).group(1)
        return banners, [x.strip() for x in " ".join(listed.split()).split(",")]

    def test_banner_outline_order(self):
        banners, listed = self.outline()
        assert banners[:4] == ["Constants and defaults", "Errors", "Logging and metrics", "Configuration"]
        assert len(set(banners)) == len(banners)
        assert [b for b in banners if b in listed] == listed, "banners follow the docstring's Sections order"
        order = ["Pure helpers", "Encryption", "Translation", "Store", "Clients", "Bridge", "Workers",
                 "HTTP server", "Operations", "Command line"]
        assert [b for b in banners if b in order] == order   # dependencies point upward

    def test_docstring_sections_list_every_banner(self):
        banners, listed = self.outline()
        assert [b for b in banners if b not in listed] == [], "banners missing from the docstring's Sections list"

    def test_each_banner_is_three_lines(self):
        lines = product_source().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^# .+ #{3,}$", line):
                assert re.fullmatch(r"#{79}", lines[i - 1]) and re.fullmatch(r"#{79}", lines[i + 1]), i + 1

    def test_env_example_lists_every_variable(self):
        with open(os.path.join(REPO_DIR, "env.example"), encoding="utf-8") as f:
            listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", f.read(), re.M))
        read = set(re.findall(r'environ(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', product_source())) | set(ws.ENV_OVERRIDES)
        read.discard("WHATSIGNAL_REEXEC")   # internal
        assert sorted(read - listed) == []

    def test_dockerfile_basics(self):
        with open(os.path.join(REPO_DIR, "Dockerfile"), encoding="utf-8") as f:
            text = f.read()
        assert re.search(r"^FROM python:3\.\d+", text, re.M)
        assert "PYTHONDONTWRITEBYTECODE=1" in text
        assert re.search(r"^EXPOSE 8082$", text, re.M)
        assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
        user = re.findall(r"^USER (\S+)", text, re.M)
        assert user and user[-1].split(":")[0] not in ("root", "0")

    @staticmethod
    def paths_leaving_the_repository(source, name):
        """Return "file:line: text" for each path in *source* that climbs out of the file's own folder.

        A path is anchored at the repository when it is built from ``__file__`` (directly, or through a
        module-level name assigned from it); such a path may not contain ``..``.  And no string may name
        the workshop's contract folder, which a clone of the repository does not have.
        """
        tree = ast.parse(source)
        anchored = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(n, ast.Name) and n.id == "__file__"
                                                    for n in ast.walk(node.value)):
                anchored.update(t.id for t in node.targets if isinstance(t, ast.Name))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.search(r"shared[/\\]contracts|\.\.[/\\]shared", node.value):
                found.append("%s:%d: %r" % (name, node.lineno, node.value))
            if not isinstance(node, ast.Call):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if "__file__" not in names and not names & anchored:
                continue
            ups = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and re.search(r"(^|[/\\])\.\.([/\\]|$)", n.value)]
            if ups:
                found.append("%s:%d: %r" % (name, node.lineno, ups))
        return found

    def test_no_path_leaves_the_repository(self):
        for path in (WS_PATH, os.path.abspath(__file__)):
            with open(path, encoding="utf-8") as f:
                assert self.paths_leaving_the_repository(f.read(), os.path.basename(path)) == []
        # The scan finds what it is meant to find.
        old = 'D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "elsewhere", "x")\n'
        assert len(self.paths_leaving_the_repository(old, "old.py")) == 1
        assert len(self.paths_leaving_the_repository('P = "../' + 'shared' + '/contracts/fixtures"\n', "p.py")) == 1
        assert self.paths_leaving_the_repository('os.path.join(cache, "..", "escape.pdf")\n', "ok.py") == []
        # and the test data it reads is inside the repository
        assert os.path.commonpath([FIXTURES, REPO_DIR]) == REPO_DIR and os.path.isdir(FIXTURES)

    def test_compose_healthcheck_uses_health(self):
        with open(os.path.join(REPO_DIR, "docker-compose.yml"), encoding="utf-8") as f:
            text = f.read()
        # Python's own urllib (no package installed for it); /health is 503 when the database is unusable
        assert "urllib.request.urlopen('http://127.0.0.1:8082/health'" in text and "wget" not in text
        assert "read_only: true" in text and "no-new-privileges:true" in text

###############################################################################
# WhatsApp to Signal ##########################################################
###############################################################################

# -- demo and bench ------------------------------------------------------------------------------

BENCH_FIGURES = {
    "machine": {"cpus", "python", "platform"},
    "baseline": {"1", "8", "32"}, "ingest": {"1", "8", "32"},
    "startup_s": None, "rss_idle_mb": None, "rss_hwm_start_mb": None, "rss_peak_mb": None, "rss_hwm_mb": None,
    "w2s_at_200": {"offered_per_s", "messages", "delivered", "lost", "duplicated", "p50_ms", "p99_ms"},
    "burst": {"messages", "ingest_rps", "errors", "all_delivered_s", "delivered", "lost", "duplicated",
              "sustained_delivered_per_s"},
    "s2w_at_200": {"offered_per_s", "messages", "delivered", "lost", "duplicated", "delivered_per_s", "p50_ms", "p99_ms"},
    "s2w_burst": {"offered_per_s", "messages", "delivered", "lost", "duplicated", "delivered_per_s", "p50_ms", "p99_ms"},
    "history": {"messages", "ingest_rps", "errors", "all_delivered_s", "delivered", "lost", "duplicated",
                "sustained_delivered_per_s", "peak_rss_mb", "vmhwm_mb"},
    "media": {"size_mb", "delivered", "seconds", "rss_before_mb", "peak_rss_mb", "peak_increase_mb"},
    "growth": None,
}
LOAD_FIGURES = {"concurrency", "errors", "p50_ms", "p95_ms", "p99_ms", "requests", "rps"}
MEASURED_FIGURES = {"cpu_user_us", "cpu_sys_us", "machine_busy_pct"} if os.path.exists("/proc/stat") else set()


class TestDemoAndBench:
    def test_demo_plays_the_whole_conversation(self, tmp_path):
        p = subprocess.run([sys.executable, WS_PATH, "demo"], cwd=str(tmp_path), env=clean_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        out = p.stdout
        for line in ("owner sees: 'Alice Example: Are we still on for dinner tonight?'",
                     "owner sees: 1 photo + 'Alice Example: The place I booked'",
                     "receives 'Yes! 8 pm, see you there' as a reply to false_4915111111189@c.us_3EB0DEMO0001",
                     "PUT /api/reaction with 👍 on false_4915111111189@c.us_3EB0DEMO0002",
                     "bridge answers: 'Recent chats",
                     "WAHA calls: 2, Signal sends: 3, unauthorized senders: 1"):
            assert line in out, (line, out)
        assert "Traceback" not in p.stderr and os.listdir(str(tmp_path)) == [], "the demo leaves nothing behind"

    def test_bench_tiny_produces_every_figure(self, tmp_path):
        """`bench --tiny`: the same run as `bench` with loads of seconds; every figure of the JSON line is there."""
        p = subprocess.run([sys.executable, WS_PATH, "bench", "--tiny"], cwd=str(tmp_path), env=clean_env(),
                           capture_output=True, text=True, timeout=170)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert set(r) == set(BENCH_FIGURES), set(r) ^ set(BENCH_FIGURES)
        for name, keys in BENCH_FIGURES.items():
            if keys is not None:
                assert set(r[name]) == keys, (name, set(r[name]) ^ keys)
            else:
                assert isinstance(r[name], (int, float, dict)), name
        for name in ("baseline", "ingest"):
            assert all(set(x) == LOAD_FIGURES | MEASURED_FIGURES and x["requests"] > 0 for x in r[name].values()), r[name]
            for x in r[name].values():     # the server's CPU per request and the machine's load, where /proc has them
                assert all(isinstance(x[k], int) and x[k] >= 0 for k in MEASURED_FIGURES), x
                assert not MEASURED_FIGURES or (x["cpu_user_us"] + x["cpu_sys_us"] > 0 and x["machine_busy_pct"] <= 100), x
        assert len(r["growth"]) == 2 and all(set(g) == {"rps", "p50_ms", "p95_ms", "p99_ms", "errors"}
                                             for g in r["growth"].values()), r["growth"]
        # what the run proves about the bridge whatever the machine: nothing lost or duplicated, the video went
        for name in ("w2s_at_200", "burst", "s2w_at_200", "s2w_burst", "history"):
            assert (r[name]["lost"], r[name]["duplicated"]) == (0, 0), (name, r[name])
        assert r["media"]["delivered"] is True
        for label in ("ingest/baseline at concurrency 8", "WhatsApp->Signal burst of", "history sync of", "growth:",
                      "server CPU/req"):
            assert label in p.stdout, label


# ---------------------------------------------------------------------------
# Issue 3: WhatsApp -> Signal. Every WAHA event reaches the owner's Signal,
# durably and exactly once.
# ---------------------------------------------------------------------------



JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)) * 8
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2
PDF_BYTES = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" + b"0" * 512
OGG_BYTES = b"OggS\x00\x02" + bytes(range(200)) * 4
MP4_BYTES = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00" + bytes(range(256)) * 4
WEBP_BYTES = b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(range(128))
ANNA = "15550001111@c.us"
BEN = "15550002222@c.us"


# -- fakes extended for this file --------------------------------------------------------------

# -- helpers ------------------------------------------------------------------------------------

def post_event(h, event, expect="stored"):
    status, body = h.webhook(event)
    assert (status, body) == (200, {"status": expect}), body
    return body


def settle_w2s(h, timeout=10.0):
    """Wait until nothing is pending in the WhatsApp -> Signal queue."""
    assert eventually(lambda: h.app.store.queue_depth("w2s") == 0, timeout), queue_rows(h, "w2s")


def other_signal_calls(h):
    """Reactions and remote deletes sent to Signal (backend-neutral list of (kind, details))."""
    if isinstance(h.signal, FakeSignalDaemon):
        return [(r["method"], r["params"]) for r in h.signal.requests()
                if r["method"] in ("sendReaction", "remoteDelete") and r["error"] is None]
    return [(c["method"] + " " + c["path"], c["json"]) for c in h.signal.calls
            if c["path"].startswith(("/v1/reactions", "/v1/remote-delete"))]


def manual_deliverer(h):
    """Stop the app's own w2s delivery worker; return a Deliverer that a test steps on a FakeClock."""
    for w in h.app.workers:
        if isinstance(w, ws.Deliverer) and w.direction == "w2s":
            w.stop()
    clock = FakeClock(start=time.time() + 60)   # items stored from now on are due on this clock
    leader = threading.Event()
    leader.set()
    return ws.Deliverer(h.app.bridge, "w2s", leader, clock=clock.time, rand=lambda: 0.0), clock


def drain(h, deliverer, clock, step=301.0, limit=40):
    """run_once / advance the clock until the w2s queue is empty; bounded."""
    for _ in range(limit):
        deliverer.run_once()
        if h.app.store.queue_depth("w2s") == 0:
            return True
        clock.advance(step)
    return False


def files_outside_cache(h):
    """Files under the harness directory other than the database and the media cache dir itself."""
    found = []
    cache = os.path.abspath(h.raw["media"]["cacheDir"])
    for root, _dirs, files in os.walk(str(h.tmp_path)):
        for f in files:
            p = os.path.abspath(os.path.join(root, f))
            if p.startswith(cache + os.sep) or os.path.basename(p).startswith("whatsignal.db"):
                continue
            found.append(p)
    return found


def cache_files(h):
    d = h.raw["media"]["cacheDir"]
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ===============================================================================================
# Translation (pure functions)
# ===============================================================================================

WAHA_FIXTURES = sorted(f for f in os.listdir(FIXTURES)
                           if f.startswith("waha-") and f.endswith(".json") and f != "waha-openapi.json")

# fixture -> None (not bridged) | "PayloadError" | (kind, dedupe, chat, {record fields to check})
PARSED_EXPECTED = {
    "waha-ack-group.json": ("message.ack", "a:120363026666666666@g.us:3EB0ACE0ACE0ACE0ACE0ACE0ACE0ACE0:3", "120363026666666666@g.us",
                            {"bare": "3EB0ACE0ACE0ACE0ACE0ACE0ACE0ACE0", "ack": 3}),
    "waha-ack.json": ("message.ack", "a:15550003333@c.us:3EB0ACE0ACE0ACE0ACE0ACE0ACE0ACE0:3", "15550003333@c.us",
                      {"bare": "3EB0ACE0ACE0ACE0ACE0ACE0ACE0ACE0", "ack": 3}),
    "waha-edited-derived.json": ("message.edited", None, "15550000002@c.us",
                                 {"target_bare": "3EB0C0FFEE0000000000A1", "body": "Hello (edited)"}),
    "waha-message-document.json": ("message", "m:" + "3EB0D0C0000000000000000000000001", "15550003333@c.us",
                                   {"bare": "3EB0D0C0000000000000000000000001", "body": "", "sender": "15550003333@c.us", "reply": None,
                                    "media": {"url": "http://localhost:3000/api/files/true_15550003333@c.us_"
                                              + "3EB0D0C0000000000000000000000001" + ".pdf", "mimetype": "application/pdf",
                                              "filename": "tickets.pdf", "error": None}}),
    "waha-message-group-derived.json": ("message", "m:3EB0C0FFEE1234567890AB", FAMILY,
                                        {"bare": "3EB0C0FFEE1234567890AB", "body": "Hi everyone",
                                         "sender": "15550000004@c.us", "media": None}),
    "waha-message-image-derived.json": ("message", "m:3EB0123456789ABCDEF012", "15550000002@c.us",
                                        {"body": "Check this out (caption)",
                                         "media": {"url": "http://localhost:3000/api/files/default/3EB0123456789ABCDEF012.jpeg",
                                                   "mimetype": "image/jpeg", "filename": None, "error": None}}),
    "waha-message-image.json": ("message", "m:" + "3EB0D0C0000000000000000000000001", "15550003333@c.us",
                                {"body": "The view from the top (caption)!"}),
    "waha-message-reply.json": ("message", "m:" + "3EB0D0C0000000000000000000000001", "15550003333@c.us",
                                {"body": "Yes, lovely!", "reply": {"id": "3EB0D0C000000000002", "body": "The view from the top",
                                                           "participant": "15550004444@c.us"}}),
    "waha-message-text.json": None,          # fromMe: the owner's own message, never echoed
    "waha-presence-update.json": None,       # not an event the bridge handles
    "waha-reaction.json": ("message.reaction", "r:" + "3EB0EAC7000000000000000000000001" + ":15550005555@c.us:1710481111.853:🙏",
                           "15550005555@c.us", {"target": "true_15550005555@c.us_" + "3EB0EAC7000000000000000000000001", "target_bare": "3EB0EAC7000000000000000000000001",
                                             "emoji": "🙏", "sender": "15550005555@c.us"}),
    "waha-revoked-derived.json": ("message.revoked", "d:15550000002@c.us:3EB0C0FFEE0000000000A1", "15550000002@c.us",
                                  {"target_bare": "3EB0C0FFEE0000000000A1"}),
    "waha-revoked.json": "PayloadError",     # docs placeholders: no chat id anywhere
    "waha-session-status-derived.json": ("session.status", "s:evt_01kdz3dhm4n6p8q0r2s4t6v8w0", "~session",
                                         {"status": "WORKING"}),
    "waha-session-status.json": ("session.status", None, "~session", {"status": "WORKING"}),
}


class TestTranslation:
    def test_every_waha_fixture_has_an_expectation(self):
        assert sorted(PARSED_EXPECTED) == WAHA_FIXTURES

    @pytest.mark.parametrize("name", WAHA_FIXTURES)
    def test_parse_waha_event_fixture(self, name):
        want = PARSED_EXPECTED[name]
        event = fixture(name)
        if want == "PayloadError":
            with pytest.raises(ws.PayloadError):
                ws.parse_waha_event(event)
            return
        got = ws.parse_waha_event(event)
        if want is None:
            assert got is None
            return
        kind, dedupe, chat, fields = want
        assert (got.kind, got.session, got.chat) == (kind, "default", chat)
        assert got.record["event"] == kind
        if dedupe is not None:
            assert got.dedupe == dedupe
        else:
            assert got.dedupe.startswith({"message.edited": "e:", "session.status": "s:"}[kind])
        for k, v in fields.items():
            assert got.record[k] == v, k

    def test_old_session_status_without_event_id_still_gets_a_dedupe_key(self):
        a = ws.parse_waha_event(fixture("waha-session-status.json"))
        assert a.dedupe.startswith("s:WORKING:")

    @pytest.mark.parametrize("reply_to", [
        {"id": "3EB0AABBCCDD", "participant": "15550001111@c.us", "body": "the original", "hasMedia": False},
        {"id": "false_15550001111@c.us_3EB0AABBCCDD", "participant": None, "body": "the original", "hasMedia": False},
        {"id": "false_120363025555555555@g.us_3EB0AABBCCDD_15550001111@c.us", "body": "the original"},
        "false_15550001111@c.us_3EB0AABBCCDD",
        "3EB0AABBCCDD",
    ], ids=["object-bare", "object-serialized", "object-group-serialized", "string-serialized", "string-bare"])
    def test_reply_to_every_shape_gives_the_bare_id(self, reply_to):
        ev = {"event": "message", "session": "default",
              "payload": {"id": "false_15550001111@c.us_3EB0REPLY", "from": ANNA, "body": "answer",
                          "replyTo": reply_to}}
        rec = ws.parse_waha_event(ev).record
        assert rec["reply"]["id"] == "3EB0AABBCCDD"
        assert rec["reply"]["body"] == (reply_to.get("body") if isinstance(reply_to, dict) else None)

    def test_reply_to_of_wrong_type_is_a_payload_error(self):
        ev = {"event": "message", "session": "default",
              "payload": {"id": "false_15550001111@c.us_3EB0X", "from": ANNA, "body": "x", "replyTo": 42}}
        with pytest.raises(ws.PayloadError):
            ws.parse_waha_event(ev)

    @pytest.mark.parametrize("payload", [
        {"id": "false_status@broadcast_3EB0S", "from": "status@broadcast", "body": "my status"},
        {"id": "false_120363111@newsletter_3EB0N", "from": "120363111@newsletter", "body": "news"},
        {"id": "false_15550001111@c.us_3EB0E", "from": ANNA, "body": "", "hasMedia": False},
        {"id": "false_15550001111@c.us_3EB0E", "from": ANNA, "body": None},
        {"id": "true_15550001111@c.us_3EB0F", "from": ANNA, "fromMe": True, "body": "mine"},
    ], ids=["status-broadcast", "newsletter", "empty-system", "null-body", "fromMe"])
    def test_messages_not_forwarded(self, payload):
        assert ws.parse_waha_event({"event": "message", "session": "default", "payload": payload}) is None

    def test_message_any_is_the_same_item_as_message_and_api_sends_are_dropped(self):
        payload = {"id": "false_15550001111@c.us_3EB0A", "from": ANNA, "body": "hi"}
        any_ = ws.parse_waha_event({"event": "message.any", "session": "default", "payload": payload})
        plain = ws.parse_waha_event({"event": "message", "session": "default", "payload": payload})
        assert (any_.kind, any_.dedupe) == (plain.kind, plain.dedupe) == ("message", "m:3EB0A")
        mine = dict(payload, id="true_15550001111@c.us_3EB0B", fromMe=True, source="api")
        assert ws.parse_waha_event({"event": "message.any", "session": "default", "payload": mine}) is None
        own = ws.parse_waha_event({"event": "message.any", "session": "default", "payload": dict(mine, source="app")})
        assert (own.kind, own.chat, own.record["body"]) == ("message.own", ANNA, "hi")

    def test_lid_participant_kept_for_resolution(self):
        ev = {"event": "message", "session": "default",
              "payload": {"id": "false_120363025555555555@g.us_3EB0L_77001122334455@lid", "from": FAMILY,
                          "participant": "77001122334455@lid", "body": "hi"}}
        inbound = ws.parse_waha_event(ev)
        assert (inbound.chat, inbound.record["sender"]) == (FAMILY, "77001122334455@lid")

    def test_location_and_vcard_records(self):
        ev = {"event": "message", "session": "default",
              "payload": {"id": "false_15550001111@c.us_3EB0LOC", "from": ANNA, "body": "",
                          "location": {"latitude": "52.5163", "longitude": "13.3777", "name": "Brandenburger Tor",
                                       "address": "Pariser Platz, Berlin", "live": False},
                          "vCards": ["BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Erin Example\r\n"
                                     "TEL;type=CELL;waid=15550009999:+1 555 000 9999\r\nEND:VCARD"]}}
        rec = ws.parse_waha_event(ev).record
        assert rec["location"] == {"lat": 52.5163, "lon": 13.3777, "name": "Brandenburger Tor",
                                   "address": "Pariser Platz, Berlin"}
        text = ws.render_for_signal(rec, "Alice")
        assert text == ("Alice: 📍 Brandenburger Tor, Pariser Platz, Berlin https://maps.google.com/?q=52.516300,13.377700\n"
                        "👤 Erin Example, +1 555 000 9999")

    @pytest.mark.parametrize("kwargs, want", [
        ({}, "Alice Example: hello"),
        ({"group_name": "Family"}, "Alice Example in Family: hello"),
        ({"inline_quote": "what time?"}, "> what time?\nAlice Example: hello"),
        ({"inline_quote": "x" * 100}, "> " + "x" * 59 + "…\nAlice Example: hello"),
        ({"inline_quote": "line one\nline two"}, "> line one line two\nAlice Example: hello"),
        ({"notice": "video, 83 MB, over the 50 MB limit"}, "Alice Example: [video, 83 MB, over the 50 MB limit]\nhello"),
        ({"prefix": False}, "hello"),
        ({"group_name": "Family", "prefix": False}, "hello"),
    ])
    def test_render_for_signal(self, kwargs, want):
        assert ws.render_for_signal({"body": "hello"}, "Alice Example", **kwargs) == want

    def test_render_notice_without_caption(self):
        assert ws.render_for_signal({"body": ""}, "+15550001111", notice="image, expired on WhatsApp's server") \
            == "+15550001111: [image, expired on WhatsApp's server]"

    @pytest.mark.parametrize("jid, want", [
        ("15550001111@c.us", "15550001111@c.us"),
        ("15550001111@s.whatsapp.net", "15550001111@c.us"),
        ("15550001111:7@s.whatsapp.net", "15550001111@c.us"),
        ("77001122334455@lid", "77001122334455@lid"),
        ("77001122334455:3@LID", "77001122334455@lid"),
        (FAMILY, FAMILY),
        ("status@broadcast", "status@broadcast"),
        ("someone@example.com", None),
        ("@c.us", None),
        ("15550001111", None),
        (None, None),
        (42, None),
    ])
    def test_normalize_jid(self, jid, want):
        assert ws.normalize_jid(jid) == want

    @pytest.mark.parametrize("jid, phone", [
        ("15550001111@c.us", "+15550001111"), ("15550001111@s.whatsapp.net", "+15550001111"),
        ("77001122334455@lid", None), (FAMILY, None), ("abc@c.us", None), (None, None)])
    def test_jid_to_phone(self, jid, phone):
        assert ws.jid_to_phone(jid) == phone

    @pytest.mark.parametrize("number, jid", [("+15550001111", "15550001111@c.us"), ("15550001111", None),
                                             ("+0123456789", None), ("", None), (None, None)])
    def test_phone_to_jid(self, number, jid):
        assert ws.phone_to_jid(number) == jid

    @pytest.mark.parametrize("mid, parts, bare", [
        ("false_15550001111@c.us_3EB0AA", (False, "15550001111@c.us", "3EB0AA", None), "3EB0AA"),
        ("true_120363025555555555@g.us_3EB0AA_77001122334455@lid",
         (True, FAMILY, "3EB0AA", "77001122334455@lid"), "3EB0AA"),
        ({"_serialized": "false_15550001111@c.us_3EB0AA"}, (False, "15550001111@c.us", "3EB0AA", None), "3EB0AA"),
        ("3EB0AA", None, "3EB0AA"),
        ("maybe_15550001111@c.us_3EB0AA", None, "maybe_15550001111@c.us_3EB0AA"),
        ("", None, None),
        ("A" * 129, None, None),
    ])
    def test_msg_id_parts_and_bare_id(self, mid, parts, bare):
        assert ws.msg_id_parts(mid) == parts
        if isinstance(mid, str):
            assert ws.bare_msg_id(mid) == bare

    @pytest.mark.parametrize("url, ok", [
        ("http://127.0.0.1:3000/api/files/default/x.jpeg", True),
        ("http://127.0.0.1:3001/api/files/default/x.jpeg", False),
        ("https://127.0.0.1:3000/api/files/default/x.jpeg", False),
        ("http://localhost:3000/api/files/default/x.jpeg", False),
        ("file:///etc/passwd", False),
        ("ftp://127.0.0.1:3000/x", False),
        ("//127.0.0.1:3000/api/files/x", False),
        ("http://127.0.0.1:3000@evil.example/x.jpeg", False),
        ("http://user:pw@127.0.0.1:3000/x.jpeg", False),
        ("http://evil.example/#@127.0.0.1:3000/", False),
        ("", False),
        (None, False),
    ])
    def test_media_url_only_from_waha_origin(self, url, ok):
        client = ws.WahaClient("http://127.0.0.1:3000", WAHA_KEY)
        if ok:
            client.check_media_url(url)
        else:
            with pytest.raises(ws.PermanentError):
                client.check_media_url(url)

    @pytest.mark.parametrize("declared, head, ok", [
        ("image/jpeg", JPEG_BYTES[:16], True), ("image/jpeg", PNG_BYTES[:16], True),
        ("image/jpeg", b"<html><body>", False), ("image/png", b"MZ\x90\x00", False),
        ("video/mp4", MP4_BYTES[:16], True), ("audio/ogg", OGG_BYTES[:16], True), ("audio/ogg", JPEG_BYTES[:16], False),
        ("application/pdf", PDF_BYTES[:16], True), ("application/pdf", b"\x7fELF\x02\x01", False),
        ("application/octet-stream", b"MZ\x90\x00", False),
    ])
    def test_media_type_checked_against_magic_bytes(self, declared, head, ok):
        assert ws.media_type_ok(declared, head) is ok

    @pytest.mark.parametrize("name, mime, want", [
        ("../../etc/passwd", "application/pdf", "passwd"), ("..\\..\\boot.ini", "text/plain", "boot.ini"),
        (".hidden", "image/png", "hidden"), (None, "image/jpeg", "file.jpg"), ("", "audio/ogg", "file.ogg"),
        ("a;b,c:d.pdf", "application/pdf", "a;b,c:d.pdf"), ("x\x00y.pdf", "application/pdf", "x_y.pdf")])
    def test_safe_filename(self, name, mime, want):
        assert ws.safe_filename(name, mime) == want


# ===============================================================================================
# Forwarding (end to end through the webhook endpoint)
# ===============================================================================================

# fixture -> (HTTP status, body, [(text the owner sees, [(mime, filename, bytes)])])
FILE_BYTES = {"image/jpeg": JPEG_BYTES, "application/pdf": PDF_BYTES}
E2E_EXPECTED = {
    "waha-ack-group.json": (200, {"status": "stored"}, []),
    "waha-ack.json": (200, {"status": "stored"}, []),
    "waha-edited-derived.json": (200, {"status": "stored"}, [("+15550000002 edited a message: Hello (edited)", [])]),
    "waha-message-document.json": (200, {"status": "stored"},
                                   [("+15550003333:", [("application/pdf", "tickets.pdf", PDF_BYTES)])]),
    "waha-message-group-derived.json": (200, {"status": "stored"}, [("+15550000004 in Family: Hi everyone", [])]),
    "waha-message-image-derived.json": (200, {"status": "stored"},
                                        [("+15550000002: Check this out (caption)", [("image/jpeg", "file.jpg", JPEG_BYTES)])]),
    "waha-message-image.json": (200, {"status": "stored"},
                                [("+15550003333: The view from the top (caption)!",
                                  [("image/jpeg", "file.jpg", JPEG_BYTES)])]),
    "waha-message-reply.json": (200, {"status": "stored"}, [("> The view from the top\n+15550003333: Yes, lovely!", [])]),
    "waha-message-text.json": (200, {"status": "ignored"}, []),
    "waha-presence-update.json": (200, {"status": "ignored"}, []),
    "waha-reaction.json": (200, {"status": "stored"}, [("+15550005555 reacted 🙏 to a message", [])]),
    "waha-revoked-derived.json": (200, {"status": "stored"}, [("+15550000002 deleted a message on WhatsApp", [])]),
    # Docs placeholders ("some-id-here"): no chat can be derived. 400 is right: it is not a real WAHA
    # payload, nothing can be bridged from it, and a 4xx tells the sender it is malformed.
    "waha-revoked.json": (400, None, []),     # None: a JSON {"error": "invalid payload: ..."}
    "waha-session-status-derived.json": (200, {"status": "stored"}, []),
    "waha-session-status.json": (200, {"status": "stored"}, []),
}

SEND_SHAPES = [("daemon", "object"), ("rest", "object"), ("rest", "array")]


class TestForwarding:
    def test_every_fixture_has_an_end_to_end_expectation(self):
        assert sorted(E2E_EXPECTED) == WAHA_FIXTURES

    @pytest.mark.parametrize("name", WAHA_FIXTURES)
    def test_fixture_through_webhook(self, make_bridge, name):
        """Into the signal-cli daemon and the REST API (object and array /v2/send shapes) at once."""
        bridges = make_bridge.many(*[{"backend": k, "send_shape": shape} for k, shape in SEND_SHAPES])
        want_status, want_body, want = E2E_EXPECTED[name]
        for h, backend in zip(bridges, SEND_SHAPES):
            h.waha.group_names[FAMILY] = "Family"
            event = fresh(fixture(name))
            media = event["payload"].get("media") if isinstance(event.get("payload"), dict) else None
            if media and media.get("url"):
                # WAHA_BASE_URL behind Docker differs; the bridge's WAHA is the fake: same path, fake's origin
                path = urllib.parse.urlsplit(media["url"]).path
                h.waha.add_file(path, FILE_BYTES[media["mimetype"]], media["mimetype"])
                media["url"] = h.waha.url + path
            status, body = h.webhook(event)
            assert status == want_status, backend
            if want_body is None:
                assert list(body) == ["error"] and body["error"].startswith("invalid payload"), body
            else:
                assert body == want_body, backend
        for h, backend in zip(bridges, SEND_SHAPES):
            settle_w2s(h)
            got = h.received()
            assert [(d["text"], d["atts"]) for d in got] == want, backend
            assert all(d["to"] == OWNER and d["quote_ts"] is None and d["edit"] is None for d in got), backend
            assert other_signal_calls(h) == [], backend
            assert [q["state"] for q in queue_rows(h, "w2s")] == (["done"] if want_body == {"status": "stored"} else [])
            for c in h.waha.calls_for("/api/files/"):
                assert c["headers"].get("x-api-key") == WAHA_KEY

    def test_sender_naming(self, make_bridge):
        """Contact name (WAHA contacts), else ~push name (+number), else +number; groups add "in <group name>"."""
        h = make_bridge()
        cases = [  # (sender, WAHA contact entry, group subject or None for a 1:1 chat, push name, expected)
            ("15550001001@c.us", "Alice Example", None, "Ali", "Alice Example: hello"),
            ("15550001002@c.us", {"name": None, "pushname": "Alice P"}, None, None, "~Alice P (+15550001002): hello"),
            ("15550001003@c.us", None, None, "Ali", "~Ali (+15550001003): hello"),
            ("15550001004@c.us", None, None, None, "+15550001004: hello"),
            ("15550001005@c.us", "Alice Example", "Family", None, "Alice Example in Family: hello"),
            ("15550001006@c.us", None, "Family", "Ali", "~Ali (+15550001006) in Family: hello"),
            ("15550001007@c.us", None, "Family", None, "+15550001007 in Family: hello"),
        ]
        for i, (sender, contact, subject, push, _want) in enumerate(cases):
            if contact is not None:
                h.waha.contacts[sender] = contact
            if subject is None:
                post_event(h, wa_message(sender, "3EB0NAME%d" % i, "hello", push=push))
            else:
                group = "12036300000000000%d@g.us" % i
                h.waha.group_names[group] = subject
                post_event(h, wa_message(group, "3EB0NAME%d" % i, "hello", participant=sender, push=push))
        settle_w2s(h)
        assert sorted(h.texts()) == sorted(c[-1] for c in cases)

    def test_contact_names_are_cached(self, make_bridge):
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice Example"
        for i in range(3):
            post_event(h, wa_message(ANNA, "3EB0CACHE%d" % i, "m%d" % i))
        settle_w2s(h)
        assert h.texts() == ["Alice Example: m0", "Alice Example: m1", "Alice Example: m2"]
        assert len(h.waha.calls_for("/api/contacts")) == 1

    def test_contact_name_refreshed_after_a_day(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge(clock=clock.time)
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_message(ANNA, "3EB0REF1", "one"))
        settle_w2s(h)
        h.waha.contacts[ANNA] = "Alice Renamed"
        clock.advance(ws.CONTACT_TTL - 60)
        post_event(h, wa_message(ANNA, "3EB0REF2", "two"))
        settle_w2s(h)
        clock.advance(120)
        post_event(h, wa_message(ANNA, "3EB0REF3", "three"))
        settle_w2s(h)
        assert h.texts() == ["Alice: one", "Alice: two", "Alice Renamed: three"]
        assert len(h.waha.calls_for("/api/contacts")) == 2

    def test_reply_to_bridged_message_is_native_quote(self, make_bridge):
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_message(ANNA, "3EB0FIRST", "Dinner at 8?"))
        settle_w2s(h)
        first_ts = h.received()[0]["ts"]
        post_event(h, wa_message(ANNA, "3EB0SECOND", "Or 9?", replyTo={"id": "3EB0FIRST", "participant": ANNA, "body": "Dinner at 8?",
                                         "hasMedia": False}))
        settle_w2s(h)
        second = h.received()[1]
        assert second["text"] == "Alice: Or 9?"
        assert (second["quote_ts"], second["quote_author"]) == (first_ts, BRIDGE)
        assert second["quote_text"] == "Dinner at 8?"

    def test_reply_native_quote_on_rest(self, make_bridge):
        for h in make_bridge.many({"backend": "rest", "send_shape": "object"}, {"backend": "rest", "send_shape": "array"}):
            post_event(h, wa_message(ANNA, "3EB0FIRST", "Dinner at 8?"))
            settle_w2s(h)
            first_ts = h.received()[0]["ts"]
            post_event(h, wa_message(ANNA, "3EB0SECOND", "Or 9?", replyTo="false_15550001111@c.us_3EB0FIRST"))
            settle_w2s(h)
            second = h.received()[1]
            assert (second["text"], second["quote_ts"], second["quote_author"]) == \
                ("+15550001111: Or 9?", first_ts, BRIDGE), h.signal.send_shape

    def test_reply_to_unknown_message_is_inline_and_shortened(self, make_bridge):
        h = make_bridge()
        long_text = "This is the message Alice is answering, and it is far too long to quote whole here"
        post_event(h, wa_message(ANNA, "3EB0ANSWER", "Yes", replyTo={"id": "3EB0NEVERSEEN", "participant": ANNA, "body": long_text}))
        settle_w2s(h)
        d = h.received()
        assert [x["quote_ts"] for x in d] == [None]
        assert d[0]["text"] == "> " + long_text[:59] + "…\n+15550001111: Yes"

    def test_location_and_vcard_are_readable(self, make_bridge):
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_message(ANNA, "3EB0LOC", "", location={
            "latitude": "52.5163", "longitude": "13.3777", "name": "Brandenburger Tor", "address": None,
            "live": False, "url": None, "description": None, "thumbnail": None}))
        post_event(h, wa_message(ANNA, "3EB0VCF", "", vCards=[
            "BEGIN:VCARD\nVERSION:3.0\nN:Example;Erin;;;\nFN:Erin Example\n"
            "TEL;type=CELL;type=VOICE;waid=15550009999:+1 555 000 9999\nEND:VCARD"]))
        settle_w2s(h)
        assert h.texts() == ["Alice: 📍 Brandenburger Tor https://maps.google.com/?q=52.516300,13.377700",
                                "Alice: 👤 Erin Example, +1 555 000 9999"]

    def test_not_forwarded(self, make_bridge):
        h = make_bridge()
        ignored = [
            ("message.any", {"id": "true_15550001111@c.us_3EB0ANY", "from": ANNA, "fromMe": True,
                             "source": "api", "body": "x"}),     # the bridge's own send, seen again
            ("message", {"id": "true_15550001111@c.us_3EB0MINE", "from": ANNA, "fromMe": True, "source": "app",
                         "body": "sent from my phone"}),
            ("message", {"id": "false_status@broadcast_3EB0ST_15550001111@c.us", "from": "status@broadcast",
                         "participant": ANNA, "fromMe": False, "body": "my status"}),
            ("message", {"id": "false_15550001111@c.us_3EB0SYS", "from": ANNA, "fromMe": False, "body": "",
                         "hasMedia": False}),
            ("message.reaction", {"id": "true_15550001111@c.us_3EB0MYR", "from": ANNA, "fromMe": True,
                                  "reaction": {"text": "👍", "messageId": "false_15550001111@c.us_3EB0X"}}),
            ("group.v2.join", {"group": {"id": FAMILY}}),
        ]
        for name, payload in ignored:
            post_event(h, h.waha.event(name, payload), expect="ignored")
        post_event(h, wa_message(BEN, "3EB0AFTER", "marker"))
        settle_w2s(h)
        assert h.texts() == ["+15550002222: marker"]
        assert other_signal_calls(h) == []

    def test_lid_chat_resolved_and_reply_routes_to_phone_chat(self, make_bridge):
        h = make_bridge()
        lid, pn = "99887766554433@lid", "15550003333@c.us"
        h.waha.lids[lid] = pn
        h.waha.contacts[pn] = "Lena"
        post_event(h, wa_message(lid, "3EB0LID1", "via lid"))
        post_event(h, wa_message(pn, "3EB0PN2", "via phone"))
        post_event(h, wa_message(lid, "3EB0LID3", "lid again"))
        settle_w2s(h)
        d = h.received()
        assert [x["text"] for x in d] == ["Lena: via lid", "Lena: via phone", "Lena: lid again"]
        # one person is one chat, whichever id form the events carried; the lid is looked up once
        assert [c["chat"] for c in h.app.store.all_chats("default")] == [pn]
        assert len(h.waha.calls_for("/api/default/lids/")) == 1
        # the owner quote-replies the copy of the @lid message: it goes to the phone-number chat
        h.signal.push(owner_env(int(time.time() * 1000), "see you", quote=bridge_quote(d[0]["ts"])))
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        sent = h.waha.sent("text")
        assert [(s["chatId"], s["text"], s["reply_to"]) for s in sent] == [(pn, "see you", "false_%s_3EB0LID1" % lid)]

    def test_same_message_under_lid_and_phone_ids_delivered_once(self, make_bridge):
        """Engines may repeat one message with the chat as @lid once and as @c.us once (waha.md section 3, 6.5):
        it is one person, one chat, one message."""
        h = make_bridge()
        lid, pn = "99887766554433@lid", "15550003333@c.us"
        h.waha.lids[lid] = pn
        post_event(h, wa_message(lid, "3EB0SAMEMSG", "hello once"))
        settle_w2s(h)
        post_event(h, wa_message(pn, "3EB0SAMEMSG", "hello once"), expect="duplicate")
        settle_w2s(h)
        assert h.texts() == ["+15550003333: hello once"]

    def test_group_lid_participant_and_unresolvable_lid(self, make_bridge):
        h = make_bridge()
        h.waha.lids["77001122334455@lid"] = "15550004444@c.us"
        h.waha.lids["5566778899@lid"] = None                      # WAHA knows no phone number for it
        h.waha.contacts["15550004444@c.us"] = "Dora"
        h.waha.group_names[FAMILY] = "Family"
        post_event(h, wa_message(FAMILY, "3EB0GL", "hi all", participant="77001122334455@lid"))
        post_event(h, wa_message("5566778899@lid", "3EB0UL", "who am I", push="Mystery"))
        settle_w2s(h)
        assert h.texts() == ["Dora in Family: hi all", "~Mystery (hidden number): who am I"]


# ===============================================================================================
# Media
# ===============================================================================================

class TestMedia:
    def test_image_fetched_with_api_key_and_sent_with_caption(self, make_bridge):
        bridges = make_bridge.many(*[{"backend": k, "send_shape": shape} for k, shape in SEND_SHAPES])
        for h in bridges:
            h.waha.contacts[ANNA] = "Alice"
            url = h.waha.add_file("3EB0IMG.jpeg", JPEG_BYTES, "image/jpeg")
            post_event(h, wa_image(ANNA, "3EB0IMG", url, body="Look at this"))
        for h, backend in zip(bridges, SEND_SHAPES):
            settle_w2s(h)
            d = h.received()
            assert [(x["text"], x["atts"]) for x in d] == \
                [("Alice: Look at this", [("image/jpeg", "file.jpg", JPEG_BYTES)])], backend
            gets = h.waha.calls_for("/api/files/")
            assert [(c["method"], c["path"], c["headers"].get("x-api-key")) for c in gets] == \
                [("GET", "/api/files/default/3EB0IMG.jpeg", WAHA_KEY)]
            assert cache_files(h) == []
            assert files_outside_cache(h) == []

    def test_attachment_is_a_data_uri_with_filename_on_rpc(self, make_bridge):
        h = make_bridge()
        url = h.waha.add_file("3EB0DOC.pdf", PDF_BYTES, "application/pdf")
        post_event(h, wa_message(ANNA, "3EB0DOC", "", hasMedia=True, media={
            "url": url, "mimetype": "application/pdf", "filename": "../../../escape.pdf", "error": None}))
        settle_w2s(h)
        raw = h.signal.requests("send")[0]["params"]["attachments"]
        assert raw == ["data:application/pdf;filename=escape.pdf;base64," + base64.b64encode(PDF_BYTES).decode()]
        assert files_outside_cache(h) == []
        cache = h.raw["media"]["cacheDir"]
        for up in range(5):       # wherever "../../../escape.pdf" could have landed, relative to the cache
            assert not os.path.exists(os.path.join(cache, *([".."] * up), "escape.pdf"))
        assert not os.path.exists(os.path.join(os.getcwd(), "escape.pdf"))

    def test_media_kinds(self, make_bridge):
        h = make_bridge()
        cases = [("audio/ogg; codecs=opus", OGG_BYTES, None, "file.ogg", ""),          # voice note
                 ("video/mp4", MP4_BYTES, None, "file.mp4", "my video"),
                 ("image/webp", WEBP_BYTES, None, "file.webp", ""),                      # sticker
                 ("application/pdf", PDF_BYTES, "report.pdf", "report.pdf", "the report"),
                 ("image/png", PNG_BYTES, None, "file.png", "")]
        for i, (mime, data, name, _want_name, caption) in enumerate(cases):
            url = h.waha.add_file("3EB0MEDIA%d.bin" % i, data, mime.split(";")[0])
            post_event(h, wa_message(ANNA, "3EB0MEDIA%d" % i, caption, hasMedia=True, media={"url": url, "mimetype": mime, "filename": name, "error": None}))
        settle_w2s(h)
        assert [(x["text"], x["atts"]) for x in h.received()] == [
            (("+15550001111: " + caption).rstrip(), [(mime.split(";")[0], want_name, data)])
            for mime, data, _n, want_name, caption in cases]
        assert cache_files(h) == []

    def test_other_origin_file_url_and_redirect_refused(self, make_bridge):
        h = make_bridge()
        other = FakeWaha(api_key=WAHA_KEY).start()
        try:
            elsewhere = other.add_file("x.jpeg", JPEG_BYTES, "image/jpeg")
            same_port_other_host = h.waha.add_file("y.jpeg", JPEG_BYTES, "image/jpeg").replace("127.0.0.1", "localhost")
            redirect = h.waha.add_file("r.jpeg", b"", "image/jpeg", redirect_to=elsewhere)
            for i, url in enumerate([elsewhere, same_port_other_host, "file:///etc/passwd", redirect]):
                post_event(h, wa_image(ANNA, "3EB0BAD%d" % i, url, body="caption %d" % i))
            settle_w2s(h)
            assert other.calls == []          # nothing ever reached the other server
        finally:
            other.stop()
        assert [c["path"] for c in h.waha.calls_for("/api/files/")] == ["/api/files/default/r.jpeg"]
        got = [(x["text"], x["atts"]) for x in h.received()]
        assert got[:3] == [("+15550001111: [image, refused: it was not offered by WAHA]\ncaption %d" % i, [])
                           for i in range(3)]
        assert len(got) == 4 and got[3][1] == []          # the redirect: a notice, never the other server's file
        assert got[3][0].startswith("+15550001111: [image, ") and got[3][0].endswith("]\ncaption 3")
        assert cache_files(h) == [] and files_outside_cache(h) == []

    def test_redirected_media_refusal_is_logged(self, make_bridge):
        """Issue 3: a media URL pointing anywhere else is refused *and logged*; a redirect points elsewhere."""
        h = make_bridge()
        redirect = h.waha.add_file("r.jpeg", b"", "image/jpeg", redirect_to="http://169.254.169.254/latest/meta-data")
        post_event(h, wa_image(ANNA, "3EB0REDIR", redirect, body="pic"))
        settle_w2s(h)
        assert len(h.received()) == 1 and h.received()[0]["atts"] == []
        warned = [r for r in h.logs.records() if r["level"] in ("WARN", "ERROR") and "refused" in r["msg"]]
        assert len(warned) == 1, [r["msg"] for r in h.logs.records()]

    def test_oversized_by_content_length_and_huge_claim_refused_unread(self, make_bridge):
        h = make_bridge(raw_overrides={"media": {"maxSizeMB": 1}})
        url = h.waha.add_file("big.mp4", MP4_BYTES + b"\x00" * (2 * 1024 * 1024 - len(MP4_BYTES)), "video/mp4")
        post_event(h, wa_message(ANNA, "3EB0BIG", "", hasMedia=True, media={"url": url, "mimetype": "video/mp4", "filename": None, "error": None}))
        liar = h.waha.add_file("liar.jpeg", JPEG_BYTES, "image/jpeg", lie_length=50 * 1024 * 1024)
        post_event(h, wa_image(ANNA, "3EB0LIAR", liar, body="pic"))
        settle_w2s(h)
        assert [(x["text"], x["atts"]) for x in h.received()] == \
            [("+15550001111: [video, 2 MB, over the 1 MB limit]", []),
             ("+15550001111: [image, 50 MB, over the 1 MB limit]\npic", [])]
        assert cache_files(h) == []

    def test_oversized_stream_without_length_is_cut_at_the_cap(self, make_bridge):
        h = make_bridge(raw_overrides={"media": {"maxSizeMB": 1}})
        url = h.waha.add_file("big2.mp4", MP4_BYTES + b"\x00" * (3 * 1024 * 1024), "video/mp4", no_length=True)
        post_event(h, wa_message(ANNA, "3EB0BIG2", "clip", hasMedia=True, media={"url": url, "mimetype": "video/mp4", "filename": None, "error": None}))
        settle_w2s(h)
        d = h.received()
        assert len(d) == 1 and d[0]["atts"] == []
        assert d[0]["text"].startswith("+15550001111: [video, ") and "over the 1 MB limit]\nclip" in d[0]["text"]
        assert cache_files(h) == []

    def test_download_cut_short_is_never_forwarded_truncated(self, make_bridge):
        """Content-Length says 3000 bytes more than WAHA sends before closing: the download failed."""
        h = make_bridge()
        d, clock = manual_deliverer(h)
        url = h.waha.add_file("cut.jpeg", JPEG_BYTES, "image/jpeg", lie_length=len(JPEG_BYTES) + 3000)
        post_event(h, wa_image(ANNA, "3EB0CUT", url, body="pic"))
        assert drain(h, d, clock)
        got = h.received()
        assert [x["atts"] for x in got] == [[]], "a truncated file was forwarded as if complete"
        assert [x["text"] for x in got] == ["+15550001111: [image, could not be downloaded]\npic"]
        # the delivery worker's tries, plus at most one early try by the media prefetcher
        assert ws.Bridge.media_tries <= len(h.waha.calls_for("/api/files/")) <= ws.Bridge.media_tries + 1
        assert cache_files(h) == []

    def test_content_not_matching_declared_type(self, make_bridge):
        h = make_bridge()
        cases = [("image/jpeg", b"<html><script>alert(1)</script></html>",
                  "+15550001111: [image, content does not match its type; not forwarded]\nhi"),
                 ("application/pdf", b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 64,
                  "+15550001111: [document, content does not match its type; not forwarded]\nhi"),
                 ("audio/ogg", JPEG_BYTES, "+15550001111: [audio, content does not match its type; not forwarded]\nhi")]
        for i, (declared, data, _want) in enumerate(cases):
            url = h.waha.add_file("fake%d.bin" % i, data, declared)
            post_event(h, wa_message(ANNA, "3EB0FAKE%d" % i, "hi", hasMedia=True, media={"url": url, "mimetype": declared, "filename": None, "error": None}))
        settle_w2s(h)
        assert [(x["text"], x["atts"]) for x in h.received()] == [(want, []) for _d, _b, want in cases]
        assert cache_files(h) == []

    def test_expired_or_not_downloaded_media_gives_notice(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_image(ANNA, "3EB0GONE", h.waha.url + "/api/files/default/3EB0GONE.jpeg", body=""))
        post_event(h, wa_message(ANNA, "3EB0ERR", "", hasMedia=True, media={"url": None, "mimetype": "video/mp4", "filename": None,
                                       "error": "file too big"}))
        post_event(h, wa_message(ANNA, "3EB0NULL", "see this", hasMedia=True, media=None))
        settle_w2s(h)
        assert h.texts() == ["+15550001111: [image, expired on WhatsApp's server]",
                                "+15550001111: [video, not downloaded by WhatsApp's server]",
                                "+15550001111: [document, not downloaded by WhatsApp's server]\nsee this"]
        assert [c["status"] for c in h.waha.calls_for("/api/files/")] == [404]     # expired: not retried

    def test_transient_download_failure_retried_then_delivered_in_chat_order(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.waha.files["/api/files/default/busy.jpeg"] = {"status": 503}
        post_event(h, wa_image(ANNA, "3EB0BUSY", h.waha.url + "/api/files/default/busy.jpeg", body="first"))
        post_event(h, wa_message(ANNA, "3EB0AFTER", "second"))
        post_event(h, wa_message(BEN, "3EB0BOB", "other chat"))
        d.run_once()
        # Alice's chat waits behind the failing download; Bob's chat is not held up
        assert h.texts() == ["+15550002222: other chat"]
        h.waha.add_file("busy.jpeg", JPEG_BYTES, "image/jpeg")
        assert drain(h, d, clock)
        assert [(x["text"], len(x["atts"])) for x in h.received()] == \
            [("+15550002222: other chat", 0), ("+15550001111: first", 1), ("+15550001111: second", 0)]


# ===============================================================================================
# Reactions, edits, deletes, acks
# ===============================================================================================

class TestReactionsEditsDeletes:
    def test_reaction_and_removal_are_native(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_message(ANNA, "3EB0R1", "hello"))
        settle_w2s(h)
        copy_ts = h.received()[0]["ts"]
        post_event(h, wa_reaction(ANNA, "3EB0R1", "👍", "3EB0RX1"))
        post_event(h, wa_reaction(ANNA, "3EB0R1", "", "3EB0RX2"))
        settle_w2s(h)
        reactions = h.signal.sent("sendReaction")
        assert [(p["recipient"], p["emoji"], p["targetAuthor"], p["targetTimestamp"], p["remove"])
                for p in reactions] == [([OWNER], "👍", BRIDGE, copy_ts, False), ([OWNER], "👍", BRIDGE, copy_ts, True)]
        assert len(h.received()) == 1

    def test_reaction_on_rest(self, make_bridge):
        h = make_bridge("rest", send_shape="array")
        post_event(h, wa_message(ANNA, "3EB0R1", "hello"))
        settle_w2s(h)
        copy_ts = h.received()[0]["ts"]
        post_event(h, wa_reaction(ANNA, "3EB0R1", "❤️", "3EB0RX1"))
        post_event(h, wa_reaction(ANNA, "3EB0R1", "", "3EB0RX2"))
        settle_w2s(h)
        path = "/v1/reactions/" + BRIDGE
        assert [(c["method"], urllib.parse.unquote(c["path"]), c["json"], c["status"])
                for c in h.signal.calls_for("/v1/reactions")] == [
            ("POST", path, {"recipient": OWNER, "reaction": "❤️", "target_author": BRIDGE, "timestamp": copy_ts}, 204),
            ("DELETE", path, {"recipient": OWNER, "reaction": "❤️", "target_author": BRIDGE, "timestamp": copy_ts}, 204)]

    def test_reaction_to_unknown_message_is_a_notice(self, make_bridge):
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_reaction(ANNA, "3EB0NEVER", "😂", "3EB0RX9"))
        post_event(h, wa_reaction(ANNA, "3EB0NEVER", "", "3EB0RX10"))   # removal of it: nothing to say
        settle_w2s(h)
        assert h.texts() == ["Alice reacted 😂 to a message"]
        assert h.signal.sent("sendReaction") == []

    def test_edit_is_native(self, make_bridge):
        bridges = make_bridge.many(*[{"backend": k, "send_shape": shape} for k, shape in SEND_SHAPES])
        for h in bridges:
            h.waha.contacts[ANNA] = "Alice"
            post_event(h, wa_message(ANNA, "3EB0E1", "See you at 8"))
        for h, backend in zip(bridges, SEND_SHAPES):
            settle_w2s(h)
            copy_ts = h.received()[0]["ts"]
            post_event(h, wa_edit(ANNA, "3EB0E1", "See you at 9", "3EB0EDIT1"))
            settle_w2s(h)
            d = h.received()
            assert [(x["text"], x["edit"]) for x in d] == \
                [("Alice: See you at 8", None), ("Alice: See you at 9", copy_ts)], backend

    def test_group_edit_keeps_sender_and_group(self, make_bridge):
        """The native edit replaces the whole Signal text, so it must keep "<participant> in <group>: "."""
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice"
        h.waha.group_names[FAMILY] = "Family"
        post_event(h, wa_message(FAMILY, "3EB0GE1", "See you at 8", participant=ANNA))
        settle_w2s(h)
        copy_ts = h.received()[0]["ts"]
        edit = wa_edit(FAMILY, "3EB0GE1", "See you at 9", "3EB0GEDIT")
        edit["payload"].update(id="false_%s_3EB0GEDIT_%s" % (FAMILY, ANNA), participant=ANNA)
        post_event(h, edit)
        settle_w2s(h)
        assert [(x["text"], x["edit"]) for x in h.received()] == \
            [("Alice in Family: See you at 8", None), ("Alice in Family: See you at 9", copy_ts)]

    def test_edit_of_unknown_message_is_a_notice(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_edit(ANNA, "3EB0UNKNOWN", "fixed typo", "3EB0EDIT2"))
        settle_w2s(h)
        assert [(x["text"], x["edit"]) for x in h.received()] == \
            [("+15550001111 edited a message: fixed typo", None)]

    def test_delete_mirrored_by_default(self, make_bridge):
        bridges = make_bridge.many(*[{"backend": k, "send_shape": shape} for k, shape in SEND_SHAPES])
        for h in bridges:
            post_event(h, wa_message(ANNA, "3EB0D1", "oops"))
        for h, backend in zip(bridges, SEND_SHAPES):
            settle_w2s(h)
            copy_ts = h.received()[0]["ts"]
            post_event(h, wa_revoke(ANNA, "3EB0D1", "3EB0REVOKE1"))
            settle_w2s(h)
            if backend[0] == "daemon":
                assert [(p["recipient"], p["targetTimestamp"]) for p in h.signal.sent("remoteDelete")] == \
                    [([OWNER], copy_ts)]
            else:
                calls = h.signal.calls_for("/v1/remote-delete")
                assert [(c["method"], urllib.parse.unquote(c["path"]), c["json"], c["status"]) for c in calls] == \
                    [("DELETE", "/v1/remote-delete/" + BRIDGE, {"recipient": OWNER, "timestamp": copy_ts}, 201)], backend
            assert len(h.received()) == 1

    def test_delete_not_mirrored_is_a_quoted_notice(self, make_bridge):
        h = make_bridge(raw_overrides={"whatsapp": {"mirrorDeletes": False}})
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_message(ANNA, "3EB0D2", "keep me"))
        settle_w2s(h)
        copy_ts = h.received()[0]["ts"]
        post_event(h, wa_revoke(ANNA, "3EB0D2", "3EB0REVOKE2"))
        settle_w2s(h)
        d = h.received()
        assert [(x["text"], x["quote_ts"], x["quote_author"]) for x in d][1:] == \
            [("Alice deleted this message on WhatsApp", copy_ts, BRIDGE)]
        assert h.signal.sent("remoteDelete") == []

    def test_ack_recorded_for_owner_message(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_message(ANNA, "3EB0HI", "hi"))
        settle_w2s(h)
        owner_ts = int(time.time() * 1000)
        h.signal.push(owner_env(owner_ts, "hello back"))
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        assert eventually(lambda: (h.app.store.by_sig("default", owner_ts) or {}).get("direction") == "s2w")
        wa_id = h.waha.calls_for("/api/sendText")[0]["wa_id"]
        assert wa_id.startswith("true_%s_" % ANNA)

        def ack_event(ack, name):
            return h.waha.event("message.ack", {"id": wa_id, "from": ANNA, "to": None, "participant": None,
                                                "fromMe": True, "ack": ack, "ackName": name})
        post_event(h, ack_event(2, "DEVICE"))
        post_event(h, ack_event(3, "READ"))
        post_event(h, ack_event(2, "DEVICE"), expect="duplicate")
        settle_w2s(h)
        assert h.app.store.by_sig("default", owner_ts)["ack"] == 3
        assert h.texts() == ["+15550001111: hi"]      # acks are recorded, not forwarded


# ===============================================================================================
# Session status
# ===============================================================================================

SESSION_QR = ("WhatsApp session default is SCAN_QR_CODE: WhatsApp logged this device out; scan the QR code in WAHA "
          "again. Messages to WhatsApp wait until it is back.")
SESSION_BACK = "WhatsApp session default is working again."


def poll_watcher(h):
    """The bridge's session watcher, once its first read (at start) is done; tests call tick() themselves.

    Its next read is a minute away: a test that posts session.status webhooks after this barrier is not raced
    by a read of WAHA's status landing between two of them."""
    watcher = next(w for w in h.app.workers if isinstance(w, ws.SessionWatcher))
    assert eventually(lambda: watcher.ticks >= 1)
    settle_w2s(h)
    return watcher


class TestSessionStatus:
    def test_one_notice_down_none_repeated_one_back(self, make_bridge):
        h = make_bridge()
        poll_watcher(h)
        for s in ("WORKING", "SCAN_QR_CODE", "SCAN_QR_CODE", "SCAN_QR_CODE", "WORKING", "WORKING"):
            post_event(h, wa_session_status(s))
        settle_w2s(h)
        assert h.texts() == [SESSION_QR, SESSION_BACK]
        assert h.app.store.state("default", "session_status") == "WORKING"
        assert h.waha.calls_for("/api/sessions/default/restart") == []    # sessionAutoRestart is off by default

    def test_back_notice_after_starting(self, make_bridge):
        """WAHA's normal recovery is STOPPED -> STARTING -> WORKING (see the derived fixture's statuses)."""
        h = make_bridge()
        poll_watcher(h)
        for s in ("WORKING", "STOPPED", "STARTING", "WORKING"):
            post_event(h, wa_session_status(s))
        settle_w2s(h)
        assert h.texts() == [
            "WhatsApp session default is STOPPED: it was stopped; start it in WAHA (POST /api/sessions/default/start). "
            "Messages to WhatsApp wait until it is back.", SESSION_BACK]

    def test_qr_refresh_through_starting_not_repeated(self, make_bridge):
        h = make_bridge()
        poll_watcher(h)
        for s in ("SCAN_QR_CODE", "STARTING", "SCAN_QR_CODE"):
            post_event(h, wa_session_status(s))
        settle_w2s(h)
        assert h.texts() == [SESSION_QR]

    def test_auto_restart(self, make_bridge):
        h = make_bridge(raw_overrides={"whatsapp": {"sessionAutoRestart": True}})
        poll_watcher(h)
        h.waha.session_status = "FAILED"
        post_event(h, wa_session_status("FAILED"))
        post_event(h, wa_session_status("FAILED"))     # again at once: no tight restart loop, no repeat
        settle_w2s(h)
        restarts = h.waha.calls_for("/api/sessions/default/restart", "POST")
        assert [c["status"] for c in restarts] == [201]
        post_event(h, wa_session_status("WORKING"))
        settle_w2s(h)
        assert h.texts() == [
            "WhatsApp session default is FAILED: restart it in WAHA; if that fails, log out and scan the QR code "
            "again. Messages to WhatsApp wait until it is back.",
            "WhatSignal asked WAHA to restart session default (attempt 1).",
            SESSION_BACK]


# ===============================================================================================
# Durability
# ===============================================================================================

class TestDurability:
    def test_a_worker_that_loses_the_lease_mid_backlog_stops_instead_of_spinning(self, tmp_path):
        raw = raw_config(tmp_path, "http://127.0.0.1:9", rpc_url="http://127.0.0.1:9")
        config = make_config(raw)
        store = ws.Store(raw["database"]["path"])
        store.unlock(ENC_SECRET)
        try:
            bridge = ws.Bridge(config, store, ws.WahaClient("http://127.0.0.1:9", WAHA_KEY),
                               ws.SignalRpcClient("http://127.0.0.1:9", BRIDGE), ws.Log("error", stream=io.StringIO()),
                               ws.new_metrics())
            for i in range(600):    # more than one batch, all pending
                store.enqueue("default", "w2s", "d%d" % i, "c%d" % i, "message", {"body": "x"}, time.time())
            leader = threading.Event()   # never set: another instance holds the lease
            d = ws.Deliverer(bridge, "w2s", leader)
            result = []
            t = threading.Thread(target=lambda: result.append(d.run_once()), daemon=True)
            t.start()
            t.join(5.0)
            alive = t.is_alive()
            d.stopping.set()
            t.join(5.0)
            assert not alive, "run_once kept reading the same batch while not holding the lease"
            assert result and result[0][0] == 0
            assert store.queue_depth("w2s") == 600      # nothing touched
        finally:
            store.close()

    def test_duplicates_delivered_once(self, make_bridge):
        """The same event twice (WAHA retry), and the same message under a new event id (engine repeat)."""
        h = make_bridge()
        ev = wa_message(ANNA, "3EB0DUP", "only once")
        post_event(h, ev)
        post_event(h, ev, expect="duplicate")
        again = h.waha.event("message", json.loads(json.dumps(ev["payload"])))
        assert again["id"] != ev["id"]
        post_event(h, again, expect="duplicate")
        settle_w2s(h)
        post_event(h, ev, expect="duplicate")
        settle_w2s(h)
        assert h.texts() == ["+15550001111: only once"]
        assert len(queue_rows(h, "w2s")) == 1

    def test_out_of_order_reaction_and_edit_before_their_message(self, make_bridge):
        """A WAHA retry can bring a message after its reaction and edit: nothing is lost or fails."""
        h = make_bridge()
        h.waha.contacts[ANNA] = "Alice"
        post_event(h, wa_reaction(ANNA, "3EB0LATE", "👍", "3EB0LR"))
        post_event(h, wa_edit(ANNA, "3EB0LATE", "fixed", "3EB0LE"))
        post_event(h, wa_message(ANNA, "3EB0LATE", "fxed"))
        settle_w2s(h)
        assert h.texts() == ["Alice reacted 👍 to a message", "Alice edited a message: fixed", "Alice: fxed"]
        assert [q["state"] for q in queue_rows(h, "w2s")] == ["done"] * 3

    def test_signal_down_then_back_all_delivered_in_order_per_chat(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.signal.mode = "down"
        order = [(ANNA, "a1"), (BEN, "b1"), (ANNA, "a2"), (BEN, "b2"), (ANNA, "a3")]
        for i, (chat, text) in enumerate(order):
            post_event(h, wa_message(chat, "3EB0ORD%d" % i, text))    # still answered 200
        for _ in range(4):
            d.run_once()
            clock.advance(30)
        assert h.signal.rpc == [] and h.texts() == []
        q = queue_rows(h, "w2s")
        assert [r["state"] for r in q] == ["pending"] * 5
        assert [r["attempts"] for r in q] == [4, 4, 0, 0, 0]      # only each chat's head is tried
        assert all(r["error"] for r in q[:2])
        h.signal.mode = "ok"
        assert drain(h, d, clock)
        texts = h.texts()
        assert sorted(texts) == sorted("+%s: %s" % (c.split("@")[0], t) for c, t in order)
        for chat in (ANNA, BEN):
            prefix = "+%s: " % chat.split("@")[0]
            assert [t for t in texts if t.startswith(prefix)] == [prefix + t for c, t in order if c == chat]

    def test_restart_in_the_middle_loses_nothing_sends_nothing_twice(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_message(ANNA, "3EB0RS1", "one"))
        settle_w2s(h)
        h.signal.mode = "down"
        ev2 = wa_message(ANNA, "3EB0RS2", "two")
        post_event(h, ev2)
        post_event(h, wa_message(ANNA, "3EB0RS3", "three"))
        assert eventually(lambda: queue_rows(h, "w2s")[1]["attempts"] >= 1)
        h.restart()
        post_event(h, ev2, expect="duplicate")                       # dedupe survives the restart
        post_event(h, wa_message(ANNA, "3EB0RS4", "four"))
        h.signal.mode = "ok"
        settle_w2s(h, timeout=15)
        assert h.texts() == ["+15550001111: one", "+15550001111: two", "+15550001111: three", "+15550001111: four"]
        h.restart()
        post_event(h, wa_message(ANNA, "3EB0RS5", "five"))
        settle_w2s(h)
        assert len(h.texts()) == 5

    def test_permanent_failure_dead_letter_metrics_outbox_retry(self, make_bridge, capsys):
        h = make_bridge()
        h.signal.errors.append((-1, "The user +15550000002 is not registered.", "send"))
        post_event(h, wa_message(ANNA, "3EB0DEAD", "lost?"))
        assert eventually(lambda: [r["state"] for r in queue_rows(h, "w2s")] == ["dead"])
        assert eventually(lambda: len(h.texts()) == 1)     # the owner is told, not the message itself
        [told] = h.texts()
        assert told.startswith("A WhatsApp message from +15550001111 could not be delivered here: the recipient "
                               "is not registered") and "lost?" not in told
        status, metrics = http_get(h.url, "/metrics")
        assert status == 200
        assert 'whatsignal_dead_letters_total{direction="w2s"} 1.0' in metrics.splitlines()
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert any("permanently" in r["msg"] for r in errors)
        assert not any("15550000002" in json.dumps(r) for r in h.logs.records())   # numbers masked in logs
        cfg = h.tmp_path / "config.json"
        cfg.write_text(json.dumps(h.raw))
        env = {"WHATSIGNAL_ENCRYPTION_SECRET": ENC_SECRET}
        capsys.readouterr()
        assert ws.main(["--config", str(cfg), "outbox"], env) == 0
        listed = json.loads(capsys.readouterr().out)["dead"]
        assert [(x["direction"], x["kind"], x["attempts"]) for x in listed] == [("w2s", "message", 0)]
        assert "not registered" in listed[0]["error"]
        assert ws.main(["--config", str(cfg), "outbox", "retry", "all"], env) == 0
        assert json.loads(capsys.readouterr().out) == {"requeued": 1}
        settle_w2s(h)
        assert h.texts() == [told, "+15550001111: lost?"]
        assert ws.main(["--config", str(cfg), "outbox"], env) == 0
        assert json.loads(capsys.readouterr().out) == {"dead": []}

    def test_untrusted_identity_keeps_message_queued(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.signal.recipient_results[OWNER] = "IDENTITY_FAILURE"
        post_event(h, wa_message(ANNA, "3EB0ID", "new phone?"))
        for _ in range(6):
            d.run_once()
            clock.advance(400)
        q = queue_rows(h, "w2s")
        assert [(r["state"], r["attempts"]) for r in q] == [("pending", 6)]
        assert h.signal.trusted == [] and h.texts() == []
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert errors and all("trust" in r["msg"] for r in errors)
        assert "signal.trustNewIdentity" in errors[0]["msg"]
        assert [r["error"]["code"] for r in h.signal.requests("send")] == [-4] * 6

    @pytest.mark.parametrize("backend", ["daemon", "rest-json-rpc"])
    def test_trust_new_identity_trusts_then_delivers(self, make_bridge, backend):
        h = make_bridge(backend, raw_overrides={"signal": {"trustNewIdentity": True}})
        d, clock = manual_deliverer(h)
        if backend == "daemon":
            h.signal.recipient_results[OWNER] = "IDENTITY_FAILURE"
            real_trust = h.signal._methods["trust"]

            def trust(params, rec):
                result = real_trust(params, rec)
                h.signal.recipient_results.pop(OWNER, None)      # the new key is trusted from now on
                return result
            h.signal._methods["trust"] = trust
        else:
            h.signal.recipient_failures[OWNER] = "IDENTITY_FAILURE"
            real_trust = h.signal._trust

            def rest_trust(hh, call, other):
                h.signal.recipient_failures.pop(OWNER, None)
                return real_trust(hh, call, other)
            h.signal._trust = rest_trust
        post_event(h, wa_message(ANNA, "3EB0TR", "hello new phone"))
        d.run_once()
        assert h.signal.trusted == [OWNER]
        told = h.texts()           # the owner is told once that the new key is trusted
        assert len(told) == 1 and "safety number changed and is now trusted" in told[0]
        assert drain(h, d, clock)
        assert h.texts() == told + ["+15550001111: hello new phone"]


# ===============================================================================================
# Signal backends
# ===============================================================================================

class TestSignalBackends:
    def test_round_trip(self, make_bridge):
        """WhatsApp -> Signal, then the owner's quote-reply back to WhatsApp, on each backend."""
        backends = BACKENDS
        bridges = make_bridge.many(*[{"backend": b, "raw_overrides": {"signal": {"pollIntervalSeconds": 0.1}}}
                                     for b in backends])
        for h in bridges:
            h.waha.contacts[ANNA] = "Alice"
            post_event(h, wa_message(ANNA, "3EB0RT1", "Are you coming?"))
        for h, backend in zip(bridges, backends):
            settle_w2s(h)
            d = h.received()
            assert [(x["text"], x["to"]) for x in d] == [("Alice: Are you coming?", OWNER)], backend
            h.signal.push(owner_env(int(time.time() * 1000), "Yes, 10 minutes", quote=bridge_quote(d[0]["ts"])))
        for h, backend in zip(bridges, backends):
            assert h.waha.wait_for(lambda f: f.sent("text"), 10), backend
            assert [(x["chatId"], x["text"], x["reply_to"]) for x in h.waha.sent("text")] == \
                [(ANNA, "Yes, 10 minutes", "false_%s_3EB0RT1" % ANNA)], backend
            status, metrics = http_get(h.url, "/metrics")
            lines = metrics.splitlines()
            assert 'whatsignal_messages_processed_total{direction="w2s",kind="text",result="ok"} 1.0' in lines
            assert 'whatsignal_delivery_latency_seconds_count{direction="w2s"} 1' in lines

    def test_rest_rate_limit_429_is_retried(self, make_bridge):
        h = make_bridge("rest")
        d, clock = manual_deliverer(h)
        h.signal.errors.append((429, {"error": "Failed to send message due to rate limiting."}, "/v2/send"))
        post_event(h, wa_message(ANNA, "3EB0RL", "slow down"))
        d.run_once()
        assert [(r["state"], r["attempts"]) for r in queue_rows(h, "w2s")] == [("pending", 1)]
        assert h.texts() == []
        assert drain(h, d, clock)
        assert h.texts() == ["+15550001111: slow down"]
        assert [c["status"] for c in h.signal.calls_for("/v2/send")] == [429, 201]

    def test_rpc_rate_limit_waits_before_retrying(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.signal.errors.append((-5, "Failed to send message due to rate limiting", "send"))
        post_event(h, wa_message(ANNA, "3EB0RL2", "slow down"))
        d.run_once()
        clock.advance(30)
        d.run_once()
        assert len(h.signal.requests("send")) == 1          # not retried in a tight loop
        clock.advance(31)
        d.run_once()
        assert h.texts() == ["+15550001111: slow down"]

    def test_rpc_network_failure_is_retried_not_dead(self, make_bridge):
        """All recipients NETWORK_FAILURE: signal-cli answers -1 "Failed to send message" with the results in
        error.data; the cause is transient (signal-cli-jsonrpc.md section 5/6)."""
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.signal.recipient_results[OWNER] = "NETWORK_FAILURE"
        post_event(h, wa_message(ANNA, "3EB0NET", "through the tunnel"))
        d.run_once()
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending"]
        h.signal.recipient_results.clear()
        assert drain(h, d, clock)
        assert h.texts() == ["+15550001111: through the tunnel"]

    def test_rpc_unregistered_owner_is_dead(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        h.signal.recipient_results[OWNER] = "UNREGISTERED_FAILURE"
        post_event(h, wa_message(ANNA, "3EB0UNR", "anyone?"))
        d.run_once()
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["dead"]

    def test_rpc_transport_failures_are_transient(self, make_bridge):
        h = make_bridge()
        d, clock = manual_deliverer(h)
        for i, mode in enumerate(["down", "http500"]):
            h.signal.mode = mode
            post_event(h, wa_message(ANNA, "3EB0TF%d" % i, "later %d" % i))
            d.run_once()
            assert [(r["state"], r["attempts"]) for r in queue_rows(h, "w2s")][i] == ("pending", 1), mode
            h.signal.mode = "ok"
            assert drain(h, d, clock)
        assert h.texts() == ["+15550001111: later 0", "+15550001111: later 1"]

    def test_rest_timestamp_stored_for_both_response_shapes(self, make_bridge):
        for h in make_bridge.many({"backend": "rest", "send_shape": "object"}, {"backend": "rest", "send_shape": "array"}):
            post_event(h, wa_message(ANNA, "3EB0TS", "first"))
            settle_w2s(h)
            sent_ts = h.signal.calls_for("/v2/send")[0]["timestamps"][0]
            assert h.app.store.by_wa("default", "3EB0TS")["sig_ts"] == sent_ts, h.signal.send_shape


# ===============================================================================================
# Each WAHA engine's own payloads (testdata/waha/<engine>/, see its README.md)
# ===============================================================================================

ENGINE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "waha")
ENGINES = ("GOWS", "NOWEB", "WEBJS")
ENGINE_ALICE, ENGINE_BOB, ENGINE_BOB_LID = "447700900123@c.us", "447700900456@c.us", "81234567890123@lid"
ENGINE_GROUP = "120363040000000001@g.us"
ENGINE_IDS = {"text": "3EB0C5D1A1CE000000000001", "group": "3EB0C5D1B0B0000000000002",
           "media": "3EB0C5D1A1CE000000000004", "owner": "3EB0C5D1000000000000000A",
           "group_owner": "3EB0C5D1000000000000000C"}


def engine_event(engine, name, replace=None):
    """An engine's recorded webhook, dated now (and with *replace* {old: new} applied to its text)."""
    with open(os.path.join(ENGINE_DIR, engine.lower(), name + ".json"), encoding="utf-8") as f:
        text = f.read()
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    event = json.loads(text)
    now = time.time()
    event["timestamp"] = int(now * 1000)
    for obj in (event["payload"], event["payload"].get("after")):
        if isinstance(obj, dict) and isinstance(obj.get("timestamp"), (int, float)):
            obj["timestamp"] = int(now) + (obj["timestamp"] % 1)      # WEBJS reactions: fractional seconds
    return event


def engine_bridge(make_bridge, engine, **raw):
    """A bridge on WAHA's *engine*, with the contacts, group and media of the recorded payloads."""
    overrides = {"whatsapp": {"mediaBaseUrl": "http://localhost:3000"}}
    overrides.update(raw)
    h = make_bridge(raw_overrides=overrides)
    h.waha.engine = engine
    h.waha.contacts.update({ENGINE_ALICE: "Alice Example", ENGINE_BOB: "Bob Example"})
    h.waha.lids[ENGINE_BOB_LID] = ENGINE_BOB
    h.waha.group_names[ENGINE_GROUP] = "Book Club"
    media = ENGINE_IDS["media"] if engine != "WEBJS" else "false_%s_%s" % (ENGINE_ALICE, ENGINE_IDS["media"])
    h.waha.add_file("/api/files/default/%s.jpeg" % media, JPEG_BYTES, "image/jpeg")   # MediaLocalStorage key
    return h


def owner_copy_ts(h, wa):
    """Signal timestamp of the owner's copy of WhatsApp message *wa*."""
    m = h.app.store.by_wa("default", wa)
    assert m and m["sig_ts"], wa
    return m["sig_ts"]


def signal_reactions(h):
    return [(p["emoji"], p["targetTimestamp"], p["targetAuthor"]) for m, p in other_signal_calls(h)
            if m == "sendReaction"]


class TestEngines:
    """Every event the bridge handles, replayed as WEBJS, NOWEB and GOWS build it; the owner sees the same."""

    @pytest.mark.parametrize("engine", ENGINES)
    def test_every_event_as_the_engine_sends_it(self, make_bridge, engine):
        h = engine_bridge(make_bridge, engine)
        poll_watcher(h)     # the session-status step below is not raced by the watcher's read at start
        owner_ts, group_ts = new_ts(), new_ts()
        h.waha.next_ids.extend([ENGINE_IDS["owner"], ENGINE_IDS["group_owner"]])
        steps = [   # (what happens, check of what the owner sees)
            ("message-text", lambda: h.texts()[-1] == "Alice Example: Hello from Alice"),
            ("message-reply", lambda: (h.received()[-1]["text"], h.received()[-1]["quote"])
             == ("Alice Example: Yes, that one", (owner_copy_ts(h, ENGINE_IDS["text"]), BRIDGE))),
            ("message-media", lambda: (h.received()[-1]["text"], h.received()[-1]["atts"][0][2])
             == ("Alice Example: Our cat", JPEG_BYTES)),
            # the owner answers Alice; the send response's id (in the engine's shape) is remembered
            (lambda: h.signal.push(owner_env(owner_ts, "Glad you like it", quote=bridge_quote(owner_copy_ts(h, ENGINE_IDS["text"])))),
             lambda: h.app.store.by_sig("default", owner_ts)["wa_id"].split("_")[2] == ENGINE_IDS["owner"]),
            ("ack", lambda: h.app.store.by_sig("default", owner_ts)["ack"] == 3),      # read
            # Alice's reaction to the owner's message: a Signal reaction, not a text notice
            ("reaction", lambda: signal_reactions(h) == [("👍", owner_ts, OWNER)]),
            ("message-group", lambda: h.texts()[-1] == "Bob Example in Book Club: Hi book club"),
            (lambda: h.signal.push(owner_env(group_ts, "See you all there", quote=bridge_quote(owner_copy_ts(h, ENGINE_IDS["group"])))),
             lambda: h.app.store.by_sig("default", group_ts)["wa_id"].split("_")[2] == ENGINE_IDS["group_owner"]),
            ("ack-group", lambda: h.app.store.by_sig("default", group_ts)["ack"] == 3),
            ("message-lid", lambda: h.texts()[-1] == "Bob Example in Book Club: Sent from my hidden number"),
            ("reaction-group", lambda: signal_reactions(h)[-1] == ("❤️", owner_copy_ts(h, ENGINE_IDS["group"]), BRIDGE)),
            ("edited", lambda: (h.received()[-1]["text"], h.received()[-1]["edit"])
             == ("Alice Example: Hello from Alice (edited)", owner_copy_ts(h, ENGINE_IDS["text"]))),
            ("edited-group", lambda: (h.received()[-1]["text"], h.received()[-1]["edit"])
             == ("Bob Example in Book Club: Hi book club (edited)", owner_copy_ts(h, ENGINE_IDS["group"]))),
            ("revoked", lambda: [p["targetTimestamp"] for m, p in other_signal_calls(h) if m == "remoteDelete"]
             == [owner_copy_ts(h, ENGINE_IDS["text"])]),
            ("session-status", lambda: h.texts()[-1] == SESSION_QR),
        ]
        for step, check in steps:
            if callable(step):
                step()
            else:
                post_event(h, engine_event(engine, step))
            settle_w2s(h)
            assert eventually(check, 5), (engine, step, h.received()[-1:], signal_reactions(h))
        assert not any("reacted" in t for t in h.texts())
        assert [c["json"]["chatId"] for c in h.waha.calls_for("/api/sendText")] == [ENGINE_ALICE, ENGINE_GROUP]

    @pytest.mark.parametrize("engine", ENGINES)
    def test_only_the_author_may_edit_a_group_message(self, make_bridge, engine):
        """WEBJS names the sender only in _data.author: without it, group and group would always match."""
        h = engine_bridge(make_bridge, engine)
        post_event(h, engine_event(engine, "message-group"))
        settle_w2s(h)
        forged = engine_event(engine, "edited-group", {"447700900456": "447700900123", "Hi book club (edited)": "Pay here"})
        post_event(h, forged)
        settle_w2s(h)
        assert h.texts() == ["Bob Example in Book Club: Hi book club"]
        assert metric_value(h.app.metrics.render(), "whatsignal_rejected_total", reason="edit_not_by_author") == 1

    @pytest.mark.parametrize("engine", ENGINES)
    def test_groups_layout_titles_the_signal_group_with_the_whatsapp_name(self, make_bridge, engine):
        h = engine_bridge(make_bridge, engine, bridge={"layout": "groups"})
        post_event(h, engine_event(engine, "message-group"))
        settle_w2s(h)
        assert [g["name"] for g in created_groups(h)] == ["Book Club (WhatsApp)"]
        assert h.texts() == ["Bob Example: Hi book club"]

    def test_a_group_name_an_older_release_could_not_read_is_looked_up_again(self, make_bridge):
        h = engine_bridge(make_bridge, "GOWS")
        h.app.store.set_contact("default", ENGINE_GROUP, None, time.time())   # an older release found no subject
        post_event(h, engine_event("GOWS", "message-group"))
        settle_w2s(h)
        assert h.texts() == ["Bob Example in Book Club: Hi book club"]

    @pytest.mark.parametrize("engine", ENGINES)
    def test_send_response_id_read_from_each_shape(self, engine):
        fake = FakeWaha()
        fake.engine = engine
        for chat in (ENGINE_ALICE, ENGINE_GROUP):
            wa = fake._new_id(chat)
            assert ws.WahaClient.message_id(json.loads(json.dumps(fake.message_response(chat, wa, "hi")))) == wa


# ===============================================================================================
# Session status read from WAHA (lost session.status webhooks, a session stuck STARTING)
# ===============================================================================================

class TestSessionPolling:
    def test_a_change_missed_while_the_bridge_was_down_is_told_at_start(self, make_bridge):
        h = make_bridge(start=False)
        h.waha.session_status = "SCAN_QR_CODE"          # no webhook: it happened while the bridge was down
        h.start()
        poll_watcher(h)
        assert h.texts() == [SESSION_QR]

    def test_changes_missed_while_running_are_told_once(self, make_bridge):
        h = make_bridge()
        watcher = poll_watcher(h)
        assert h.texts() == []                       # WORKING at start: nothing to say
        h.waha.session_status = "FAILED"
        watcher.tick()
        watcher.tick()
        settle_w2s(h)
        h.waha.session_status = "WORKING"
        watcher.tick()
        settle_w2s(h)
        assert h.texts() == [
            "WhatsApp session default is FAILED: restart it in WAHA; if that fails, log out and scan the QR code "
            "again. Messages to WhatsApp wait until it is back.", SESSION_BACK]
        assert h.waha.calls_for("/api/sessions/default/restart") == []

    @pytest.mark.parametrize("auto", [True, False])
    def test_a_session_stuck_starting_is_told_and_restarted(self, make_bridge, auto):
        clock = FakeClock(start=time.time())
        h = make_bridge(start=False, clock=clock.time, raw_overrides={"whatsapp": {"sessionAutoRestart": auto}})
        h.waha.session_status = h.waha.status_after_restart = "STARTING"
        h.start()
        watcher = poll_watcher(h)
        for _ in range(5):                              # five minutes of STARTING: still normal
            clock.advance(60)
            watcher.tick()
        settle_w2s(h)
        assert h.texts() == []
        clock.advance(61)
        watcher.tick()
        settle_w2s(h)
        stuck = ("WhatsApp session default is STARTING: it has been starting for over 5 minutes; restart it in WAHA "
                 "(POST /api/sessions/default/restart). Messages to WhatsApp wait until it is back.")
        restarted = "WhatSignal asked WAHA to restart session default (attempt 1)."
        assert h.texts() == ([stuck, restarted] if auto else [stuck])
        clock.advance(60)                               # the restarted session gets its five minutes again
        watcher.tick()
        settle_w2s(h)
        assert len(h.waha.calls_for("/api/sessions/default/restart", "POST")) == (1 if auto else 0)
        h.waha.session_status = "WORKING"
        clock.advance(60)
        watcher.tick()
        settle_w2s(h)
        assert h.texts()[-1] == SESSION_BACK

# ===============================================================================================
# Catch-up after downtime, the owner's own phone messages, calls, polls, view-once, mentions, mute
# ===============================================================================================

ALICE_DE, BOB_DE, CAROL_DE = "4915111111189@c.us", "4915222222278@c.us", "4915333333367@c.us"


def post_webhook(url, waha, event_name, payload, expect=200):
    """Sign and POST one webhook the way WAHA does; return the status (None when the bridge is unreachable)."""
    try:
        status, _ = waha.webhook(url + "/webhook/whatsapp", waha.event(event_name, payload), WEBHOOK_SECRET, timeout=5)
    except OSError:
        return None
    if expect is not None:
        assert status == expect
    return status


def state_json(db_path, key):
    rows = db_query(db_path, "SELECT value FROM state WHERE channel='default' AND key=?", (key,))
    return json.loads(rows[0][0]) if rows and rows[0][0] else None


class TestCatchUp:
    def test_messages_missed_while_stopped_arrive_once_in_order(self, tmp_path, upstream_fakes):
        """The bridge process is stopped while 20 messages arrive in 3 chats and WAHA's webhooks fail;
        started again, it reads them from WAHA and delivers each exactly once, in order, with one
        'while the bridge was offline' line per chat.  A clean restart after that sends nothing."""
        waha, daemon = upstream_fakes
        db = str(tmp_path / "whatsignal.db")
        now = int(time.time())
        for i in range(5):          # history from before the bridge existed: never imported
            waha.remember(wa_payload(ALICE_DE, "OLD%d" % i, "old %d" % i, ts=now - 3600 + i))
        proc = BridgeProcess(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url))
        try:
            proc.start()
            assert eventually(lambda: (state_json(db, "catchup_last") or {}).get("first"), 15)
            for i, chat in enumerate((ALICE_DE, BOB_DE)):
                p = waha.remember(wa_payload(chat, "LIVE%d" % i, "live %d" % i, ts=now + i))
                assert post_webhook(proc.url, waha, "message", p) == 200
            assert daemon.wait_for(lambda d: len(d.sent("send")) == 2, 15)
            assert proc.terminate() == 0
            chats = (ALICE_DE, BOB_DE, CAROL_DE)
            for i in range(20):        # WAHA stores them; its webhooks find nobody listening
                p = waha.remember(wa_payload(chats[i % 3], "MISS%02d" % i, "missed %d" % i, ts=now + 10 + i))
                assert post_webhook(proc.url, waha, "message", p, expect=None) is None
            proc.start()
            assert daemon.wait_for(lambda d: len(d.sent("send")) >= 22, 20), daemon.texts()
            assert eventually(lambda: (state_json(db, "catchup_last") or {}).get("recovered") == 20, 10)
            texts = daemon.texts()[2:]
            bodies = [t.split(": ")[-1] for t in texts]
            assert sorted(bodies) == sorted("missed %d" % i for i in range(20))     # all 20, exactly once
            for c, chat in enumerate(chats):
                mine = [b for b in bodies if int(b.split()[-1]) % 3 == c]
                assert mine == ["missed %d" % i for i in range(c, 20, 3)]          # in order per chat
                phone = "+" + chat.split("@")[0]
                first = [t for t in texts if phone in t][0]
                assert first.startswith("%d messages while the bridge was offline:\n" % len(mine))
            assert sum("while the bridge was offline" in t for t in texts) == 3
            assert not any("old " in t for t in daemon.texts())
            # a clean restart without downtime: the pass runs, finds nothing, sends nothing
            assert proc.terminate() == 0
            before = state_json(db, "catchup_last")["at"]
            proc.start()
            assert eventually(lambda: state_json(db, "catchup_last")["at"] > before, 15)
            assert state_json(db, "catchup_last")["recovered"] == 0
            assert db_query(db, "SELECT COUNT(*) FROM queue WHERE state='pending'")[0][0] == 0
            assert len(daemon.sent("send")) == 22
            assert "whatsignal_catchup_recovered_total 0.0" in http_get(proc.url, "/metrics")[1].splitlines()
        finally:
            proc.stop()

    def test_session_back_to_working_catches_up_bounded_and_reports(self, make_bridge):
        h = make_bridge(raw_overrides={"bridge": {"catchUpMaxChats": 2, "catchUpMaxMessages": 3}})
        assert eventually(lambda: (json.loads(h.app.store.state("default", "catchup_last") or "{}")).get("first"))
        poll_watcher(h)     # its read at start cannot land between STARTING and WORKING below
        now = int(time.time())
        post_event(h, h.waha.event("message", h.waha.remember(wa_payload(ALICE_DE, "L1", "hello", ts=now))))
        assert eventually(lambda: len(h.texts()) == 1)
        post_event(h, wa_session_status("STARTING"))
        for i in range(15):          # 3 chats x 5 messages while WAHA reconnected and its webhooks failed
            h.waha.remember(wa_payload((ALICE_DE, BOB_DE, CAROL_DE)[i % 3], "G%02d" % i, "gap %d" % i, ts=now + 1 + i))
        post_event(h, wa_session_status("WORKING"))
        assert eventually(lambda: (json.loads(h.app.store.state("default", "catchup_last") or "{}")).get("chats") == 2)
        settle_w2s(h)
        texts = h.texts()[1:]
        # the two most recently active chats (Bob, Carol), the newest 3 of each, oldest first
        assert [t.split(": ")[-1] for t in texts] == ["gap 8", "gap 11", "gap 14", "gap 7", "gap 10", "gap 13"]
        assert texts[0].startswith("3 messages while the bridge was offline (the newest; older ones are on your "
                                   "phone):\n")
        reads = h.waha.calls_for("/api/default/chats/")
        assert len(reads) == 2 and all(c["query"]["limit"] == "3" and c["query"]["downloadMedia"] == "true"
                                       and int(c["query"]["filter.timestamp.gte"]) <= now for c in reads)
        listing = h.waha.calls_for("/api/default/chats", "GET")[0]["query"]
        assert (listing["sortBy"], listing["sortOrder"], listing["limit"]) == ("conversationTimestamp", "desc", "2")
        h.signal.push(owner_env(int(time.time() * 1000), "/status"))
        assert eventually(lambda: any("Last catch-up:" in (t or "") for t in h.texts()))
        status_text = [t for t in h.texts() if "Last catch-up:" in t][0]
        assert "2 chat(s) with activity, 6 message(s) recovered" in status_text
        metrics = http_get(h.url, "/metrics")[1].splitlines()
        assert "whatsignal_catchup_recovered_total 6.0" in metrics
        report = ws.stats(h.app.store, h.app.config, time.time())
        assert report["catch_up"]["default"]["recovered"] == 6

    def test_waha_down_at_start_is_retried_and_reported(self, make_bridge):
        h = make_bridge()
        post_event(h, wa_message(ANNA, "3EB0CU1", "before"))
        settle_w2s(h)
        h.app.stop()
        h.waha.mode = "error"
        h.start()
        assert eventually(lambda: "error" in json.loads(h.app.store.state("default", "catchup_last") or "{}"))
        assert "WAHA answered 500" in json.loads(h.app.store.state("default", "catchup_last"))["error"]
        assert "failed" in ws.describe_catchup(h.app.store.state("default", "catchup_last"))
        h.waha.mode = "ok"
        worker = next(w for w in h.app.workers if isinstance(w, ws.CatchUp))
        assert worker.pass_once("default")
        assert json.loads(h.app.store.state("default", "catchup_last"))["recovered"] == 0

    def test_what_waha_returns_is_checked_against_the_window_too(self, make_bridge):
        """An engine that ignored filter.timestamp.gte must not bring back what is older than the window
        (the dedupe memory may have forgotten it); a NOWEB Long timestamp counts as its number."""
        h = make_bridge()
        now = int(time.time())
        old = wa_payload(ALICE_DE, "OLD1", "from last year", ts=now - 400 * 86400)
        new = wa_payload(ALICE_DE, "NEW1", "just now", timestamp={"low": now, "high": 0, "unsigned": False})
        assert h.app.bridge._recover("default", [new, old], now - 3600) == 1
        settle_w2s(h)
        assert h.texts() == ["1 message while the bridge was offline:\n+4915111111189: just now"]


def bridge_with_contacts(make_bridge, **bridge):
    h = make_bridge(raw_overrides={"bridge": bridge} if bridge else None)
    h.waha.contacts.update({ALICE_DE: "Alice Example", BOB_DE: "Bob Builder"})
    return h


def post_message_any(h, payload, expect="stored"):
    return post_event(h, h.waha.event("message.any", payload), expect)


class TestOwnMessages:
    def test_phone_messages_are_mirrored_and_the_bridges_own_sends_never_echo(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        incoming = wa_payload(ALICE_DE, "IN1", "Lunch at noon?")
        post_event(h, h.waha.event("message", incoming))
        post_message_any(h, incoming, expect="duplicate")            # `message` and `message.any` both subscribed: once
        post_message_any(h, wa_payload(ALICE_DE, "PH1", "Yes, see you there", from_me=True, source="app"))
        settle_w2s(h)
        assert h.texts() == ["Alice Example: Lunch at noon?", "You → Alice Example: Yes, see you there"]
        h.signal.push(owner_env(int(time.time() * 1000), "Bringing cake"))     # unquoted: the latest chat
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        sent = h.waha.calls_for("/api/sendText")[0]
        assert (sent["json"]["chatId"], sent["json"]["text"]) == (ALICE_DE, "Bringing cake")
        wa = sent["wa_id"].split("_")[2]
        echo = wa_payload(ALICE_DE, wa, "Bringing cake", from_me=True, source="api")
        post_message_any(h, echo, expect="ignored")                  # WAHA marks API sends source "api"
        del echo["source"]                                 # and without a source the id gives it away
        post_message_any(h, echo)
        settle_w2s(h)
        assert h.texts() == ["Alice Example: Lunch at noon?", "You → Alice Example: Yes, see you there"]

    def test_an_own_message_changes_the_unquoted_target_only_while_it_is_the_latest(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "IN2", "Are you there?")))
        post_message_any(h, wa_payload(BOB_DE, "PH2", "Call me", from_me=True, source="app"))
        settle_w2s(h)
        h.signal.push(owner_env(int(time.time() * 1000), "first"))
        assert h.waha.wait_for(lambda f: len(f.sent("text")) == 1, 10)
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "IN3", "Hello?")))
        assert eventually(lambda: len(h.texts()) == 3)
        settle_w2s(h)        # recorded too, not only sent: the latest chat is what the record says
        h.signal.push(owner_env(int(time.time() * 1000), "second"))
        assert h.waha.wait_for(lambda f: len(f.sent("text")) == 2, 10)
        assert [(b["chatId"], b["text"]) for b in h.waha.sent("text")] == [(BOB_DE, "first"), (ALICE_DE, "second")]

    def test_groups_layout_and_switching_it_off(self, make_bridge):
        h = bridge_with_contacts(make_bridge, layout="groups")
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "IN4", "hi")))
        post_message_any(h, wa_payload(ALICE_DE, "PH4", "hello from my phone", from_me=True, source="app"))
        settle_w2s(h)
        d = h.received()
        assert [x["text"] for x in d] == ["hi", "You: hello from my phone"]
        assert d[0]["to"] == d[1]["to"] and d[0]["to"] != [OWNER]        # both in Alice's Signal group
        off = bridge_with_contacts(make_bridge, mirrorOwnMessages=False)
        post_message_any(off, wa_payload(ALICE_DE, "PH5", "not mirrored", from_me=True, source="app"))
        post_event(off, off.waha.event("message", wa_payload(ALICE_DE, "IN5", "mirrored")))
        settle_w2s(off)
        assert off.texts() == ["Alice Example: mirrored"]

    def test_catch_up_mirrors_phone_messages_but_not_the_bridges_own(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        now = int(time.time())
        post_event(h, h.waha.event("message", h.waha.remember(wa_payload(ALICE_DE, "IN6", "ping", ts=now))))
        settle_w2s(h)
        h.signal.push(owner_env(int(time.time() * 1000), "pong"))
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        assert eventually(lambda: h.app.store.queue_depth("s2w") == 0)
        wa = h.waha.calls_for("/api/sendText")[0]["wa_id"].split("_")[2]
        h.app.stop()
        h.waha.remember(wa_payload(ALICE_DE, wa, "pong", ts=now + 1, from_me=True, source="api"))
        h.waha.remember(wa_payload(ALICE_DE, "PH6", "typed on the phone", ts=now + 2, from_me=True, source="app"))
        h.waha.remember(wa_payload(ALICE_DE, "IN7", "thanks", ts=now + 3))
        h.start()
        assert eventually(lambda: (json.loads(h.app.store.state("default", "catchup_last") or "{}")).get("recovered") == 2)
        settle_w2s(h)
        assert h.texts()[1:] == ["2 messages while the bridge was offline:\nYou → Alice Example: typed on the phone",
                                    "Alice Example: thanks"]


def post_call(h, event_name, call_id, caller, video=False, expect="stored"):
    """A GOWS call event (CallData: id, from, timestamp, isVideo, isGroup)."""
    return post_event(h, h.waha.event(event_name, {"id": call_id, "from": caller, "timestamp": time.time(),
                                                 "isVideo": video, "isGroup": False, "_data": {}}), expect)


class TestCallsAndViewOnce:
    def test_calls_one_line_each_and_a_missed_call_says_so(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        post_call(h, "call.received", "CALL1", ALICE_DE, video=True)
        post_call(h, "call.received", "CALL1", ALICE_DE, video=True, expect="duplicate")
        post_call(h, "call.rejected", "CALL1", ALICE_DE, video=True)           # never answered: missed
        post_call(h, "call.received", "CALL2", BOB_DE)
        post_call(h, "call.accepted", "CALL2", BOB_DE)
        post_call(h, "call.rejected", "CALL2", BOB_DE)                         # answered, then ended: nothing
        settle_w2s(h)
        assert h.texts() == ["📞 Alice Example is calling you on WhatsApp (video)",
                                "📞 Missed call from Alice Example on WhatsApp (video)",
                                "📞 Bob Builder is calling you on WhatsApp (voice)"]
        h.signal.push(owner_env(int(time.time() * 1000), "Can't talk, later"))   # unquoted: the last caller
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        assert h.waha.sent("text")[0]["chatId"] == BOB_DE
        status, body = h.webhook(h.waha.event("call.received", {"id": "X", "timestamp": 1, "isVideo": False,
                                                                "isGroup": False}))
        assert status == 400 and "payload.from" in body["error"]

    def test_view_once_media_is_a_notice_never_an_attachment(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        h.waha.group_names[FAMILY] = "Family"
        url = h.waha.add_file("VO1.jpeg", JPEG_BYTES, "image/jpeg")
        media = {"url": url, "mimetype": "image/jpeg", "filename": None, "error": None}
        # GOWS: whatsmeow's IsViewOnce flag beside the unwrapped message; WEBJS: isViewOnce and type
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "VO1", "", hasMedia=True, media=media, _data={
            "IsViewOnce": True, "Message": {"imageMessage": {"mimetype": "image/jpeg", "viewOnce": True}}})))
        post_event(h, h.waha.event("message", wa_payload(FAMILY, "VO2", "", participant=BOB_DE, hasMedia=True,
                                                       media=None, _data={"isViewOnce": True, "type": "video"})))
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "VO3", "", hasMedia=True, media=None, _data={
            "message": {"viewOnceMessageV2": {"message": {"audioMessage": {"mimetype": "audio/ogg"}}}}})))
        settle_w2s(h)
        d = h.received()
        assert [x["text"] for x in d] == [
            "view-once photo from Alice Example: open it on your phone",
            "view-once video from Bob Builder in Family: open it on your phone",
            "view-once voice message from Alice Example: open it on your phone"]
        assert all(x["atts"] == [] for x in d)
        assert not h.waha.calls_for("/api/files/")                    # not even downloaded

POLL_GOWS = {"Message": {"pollCreationMessageV3": {"name": "Lunch?", "selectableOptionsCount": 1,
                                                      "options": [{"optionName": "Pizza"}, {"optionName": "Sushi"}]}}}


def post_vote(h, chat, vote_wa, poll_id, options, voter=None):
    """A poll.vote event (PollVotePayload: vote = MessageDestination + selectedOptions, poll = MessageDestination)."""
    return h.waha.event("poll.vote", {
        "vote": {"id": "false_%s_%s" % (chat, vote_wa), "from": voter or chat, "to": "15550000001@c.us",
                 "fromMe": False, "participant": voter, "selectedOptions": options, "timestamp": int(time.time() * 1000)},
        "poll": {"id": poll_id, "from": chat, "to": "15550000001@c.us", "fromMe": False}, "_data": {}})


class TestPolls:
    def test_poll_votes_and_voting_from_signal(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        poll = wa_payload(ALICE_DE, "POLL1", None, _data=POLL_GOWS)
        post_event(h, h.waha.event("message", poll))
        post_event(h, post_vote(h, ALICE_DE, "V1", poll["id"], ["Sushi"]))
        settle_w2s(h)
        d = h.received()
        assert d[0]["text"] == "Alice Example: 📊 Lunch?\n1. Pizza\n2. Sushi\n(quote with a number to vote)"
        assert (d[1]["text"], d[1]["quote"][0]) == ("Alice Example voted: Sushi", d[0]["ts"])
        h.signal.push(owner_env(int(time.time() * 1000), "2", quote=bridge_quote(d[0]["ts"])))
        assert h.waha.wait_for(lambda f: [c for c in f.calls_for("/api/sendPollVote") if c["status"]], 10)
        call = h.waha.calls_for("/api/sendPollVote")[0]
        assert (call["status"], call["json"]) == (201, {"session": "default", "chatId": ALICE_DE,
                                                        "pollMessageId": poll["id"], "votes": ["Sushi"]})
        assert eventually(lambda: "You voted: Sushi" in h.texts())
        h.signal.push(owner_env(int(time.time() * 1000), "7", quote=bridge_quote(d[0]["ts"])))
        assert eventually(lambda: "That poll has options 1 to 2." in h.texts())
        h.waha.poll_votes = False            # a Core image before 2026.6.1: voting was a Plus feature
        h.signal.push(owner_env(int(time.time() * 1000), "1", quote=bridge_quote(d[0]["ts"])))
        assert eventually(lambda: any(t.startswith("WAHA cannot vote in polls here") for t in h.texts()))
        assert len(h.waha.calls_for("/api/sendPollVote")) == 2 and h.waha.sent("text") == []
        h.signal.push(owner_env(int(time.time() * 1000), "3 pm works", quote=bridge_quote(d[0]["ts"])))   # not a number: a reply
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        assert h.waha.sent("text")[0]["reply_to"] == poll["id"]

    def test_voting_in_a_chats_signal_group(self, make_bridge):
        h = bridge_with_contacts(make_bridge, layout="groups")
        poll = wa_payload(ALICE_DE, "POLL2", None, _data=POLL_GOWS)
        post_event(h, h.waha.event("message", poll))
        settle_w2s(h)
        d = h.received()[0]
        assert d["text"].startswith("📊 Lunch?") and d["to"] != [OWNER]
        group = h.app.store.group_of_chat("default", ALICE_DE)["group"]
        h.signal.push(owner_env(int(time.time() * 1000), "1", groupInfo={"groupId": group, "type": "DELIVER"},
                                quote={"id": d["ts"], "author": BRIDGE, "authorNumber": BRIDGE, "text": "poll",
                                       "attachments": []}))
        assert h.waha.wait_for(lambda f: [c for c in f.calls_for("/api/sendPollVote") if c["status"] == 201], 10)
        assert h.waha.calls_for("/api/sendPollVote")[0]["json"]["votes"] == ["Pizza"]
        assert eventually(lambda: "You voted: Pizza" in h.texts())

    def test_engine_shapes_of_a_poll_and_a_vote(self):
        webjs = {"event": "message", "session": "default", "payload": wa_payload(ALICE_DE, "P2", "", _data={
            "type": "poll_creation", "pollName": "Where?", "pollOptions": [{"name": "Here", "localId": 0},
                                                                          {"name": "There", "localId": 1}]})}
        noweb = {"event": "message", "session": "default", "payload": wa_payload(ALICE_DE, "P3", None, _data={
            "message": {"pollCreationMessage": {"name": "When?", "options": [{"optionName": "Now"}]}}})}
        assert ws.parse_waha_event(webjs).record["poll"] == {"name": "Where?", "options": ["Here", "There"],
                                                             "multi": False}
        assert ws.parse_waha_event(noweb).record["body"].startswith("📊 When?\n1. Now")
        group_vote = {"event": "poll.vote", "session": "default", "payload": {
            "vote": {"id": "false_%s_V9_%s" % (FAMILY, BOB_DE), "from": FAMILY, "participant": BOB_DE,
                     "fromMe": False, "selectedOptions": [], "to": FAMILY, "timestamp": 1},
            "poll": {"id": "true_%s_P9" % FAMILY, "from": FAMILY, "fromMe": True, "to": FAMILY}}}
        inbound = ws.parse_waha_event(group_vote)
        assert (inbound.chat, inbound.record["sender"], inbound.record["poll_bare"], inbound.record["options"]) == \
            (FAMILY, BOB_DE, "P9", [])
        with pytest.raises(ws.PayloadError):
            ws.parse_waha_event({"event": "poll.vote", "session": "default", "payload": {"vote": {}, "poll": {}}})


class TestMentions:
    def test_mentions_show_names_and_the_owners_at_name_becomes_a_mention(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        h.waha.group_names[FAMILY] = "Family"
        h.waha.contacts.update({CAROL_DE: "Carol Singer", "4915444444456@c.us": "Alice Other"})
        h.waha.lids["123456789012345@lid"] = CAROL_DE
        gows = wa_payload(FAMILY, "MN1", "@4915111111189 are you coming? @123456789012345 too", participant=BOB_DE,
                          _data={"Message": {"extendedTextMessage": {"text": "...", "contextInfo": {
                              "mentionedJID": ["4915111111189@s.whatsapp.net", "123456789012345@lid"]}}}})
        webjs = wa_payload(FAMILY, "MN2", "thanks @4915222222278", participant=CAROL_DE,
                           _data={"mentionedJidList": [BOB_DE]})
        post_event(h, h.waha.event("message", gows))
        post_event(h, h.waha.event("message", webjs))
        settle_w2s(h)
        d = h.received()
        assert [x["text"] for x in d] == ["Bob Builder in Family: @Alice Example are you coming? @Carol Singer too",
                                          "Carol Singer in Family: thanks @Bob Builder"]
        h.waha.participants[FAMILY] = [ALICE_DE, BOB_DE, "4915444444456@c.us"]
        h.signal.push(owner_env(int(time.time() * 1000), "@bob builder yes, and @Alice Example too; @Alice?", quote=bridge_quote(d[0]["ts"])))
        assert h.waha.wait_for(lambda f: f.sent("text"), 10)
        sent = h.waha.sent("text")[0]
        assert sent["chatId"] == FAMILY
        assert sent["text"] == "@4915222222278 yes, and @4915111111189 too; @Alice?"     # "Alice" is two people
        assert sent["mentions"] == [BOB_DE, ALICE_DE]
        h.signal.push(owner_env(int(time.time() * 1000), "mail me at a@b.example", quote=bridge_quote(d[1]["ts"])))
        assert h.waha.wait_for(lambda f: len(f.sent("text")) == 2, 10)
        assert "mentions" not in h.waha.sent("text")[1]


def owner_command(h, text, reply_starts, timeout=10.0):
    """The owner sends a command in the bridge's 1:1 conversation; return the bridge's answer."""
    h.signal.push(owner_env(int(time.time() * 1000) + random.randint(0, 999), text))
    assert eventually(lambda: any((t or "").startswith(reply_starts) for t in h.texts()), timeout), h.texts()
    return [t for t in h.texts() if (t or "").startswith(reply_starts)][-1]


class TestMute:
    def test_a_muted_chat_is_kept_and_counted_and_unmute_offers_it(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "MU0", "hello")))
        post_event(h, h.waha.event("message", wa_payload(BOB_DE, "MU9", "hi")))
        settle_w2s(h)
        assert owner_command(h, "/mute Alice Example", "Muted ") == \
            "Muted Alice Example until you unmute it. Its messages are kept, not forwarded; /unmute Alice Example " \
            "brings it back."
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "MU1", "one")))
        post_call(h, "call.received", "CALLM", ALICE_DE)
        post_message_any(h, wa_payload(ALICE_DE, "MU2", "from my phone", from_me=True, source="app"))
        post_event(h, h.waha.event("message", wa_payload(BOB_DE, "MU3", "still here")))
        settle_w2s(h)
        assert [t for t in h.texts() if not t.startswith("Muted")] == \
            ["Alice Example: hello", "Bob Builder: hi", "Bob Builder: still here"]
        assert [r["state"] for r in queue_rows(h, "w2s")].count("muted") == 3
        assert owner_command(h, "/muted", "Muted chats:") == "Muted chats:\nAlice Example: until unmuted, 3 kept"
        assert "\nMuted chats: 1 (see /muted)" in owner_command(h, "/status", "WhatSignal")
        assert owner_command(h, "/unmute Alice", "Unmuted") == \
            "Unmuted Alice Example. 3 message(s) came while it was muted; /deliver Alice Example sends them."
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "MU4", "are you there?")))
        assert eventually(lambda: "Alice Example: are you there?" in h.texts())
        assert owner_command(h, "/deliver Alice Example", "3 message(s)") == "3 message(s) from Alice Example follow."
        settle_w2s(h)
        assert h.texts()[-3:] == ["Alice Example: one", "📞 Alice Example is calling you on WhatsApp (voice)",
                                     "You → Alice Example: from my phone"]
        timed = owner_command(h, "/mute Bob Builder 8h", "Muted Bob")
        until = datetime.datetime.strptime(timed.split(" until ")[1][:20], "%Y-%m-%d %H:%M UTC").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        assert abs(until - (time.time() + 8 * 3600)) < 120
        assert owner_command(h, "/mute Nobody", "No chat named") == "No chat named 'Nobody'; see /chats."
        assert "No muted chats." not in h.texts()
        owner_command(h, "/unmute Bob Builder", "Unmuted Bob")
        assert owner_command(h, "/muted", "No muted chats.") == "No muted chats."

    def test_ignore_chats_by_id_or_name_and_status_stays_ignored(self, make_bridge):
        h = bridge_with_contacts(make_bridge, ignoreChats=["+4915333333367", "spam group"])
        h.waha.group_names[FAMILY] = "Spam Group"
        post_event(h, h.waha.event("message", wa_payload(CAROL_DE, "IG1", "never")), expect="ignored")
        post_event(h, h.waha.event("message", wa_payload(FAMILY, "IG2", "nor this", participant=BOB_DE)))
        post_event(h, h.waha.event("message", wa_payload("status@broadcast", "IG3", "my status", participant=BOB_DE)),
                 expect="ignored")
        post_event(h, h.waha.event("message", wa_payload("12036300000001@newsletter", "IG4", "news")), expect="ignored")
        post_event(h, h.waha.event("message", wa_payload(ALICE_DE, "IG5", "this one")))
        settle_w2s(h)
        assert h.texts() == ["Alice Example: this one"]
        assert "and 2 chat(s) in bridge.ignoreChats" in owner_command(h, "/muted", "Muted chats:")
        with pytest.raises(ws.ConfigError) as e:
            make_config(raw_config(h.tmp_path, h.waha.url, rpc_url=h.signal.url, bridge={"ignoreChats": [7]}))
        assert any(p.startswith("bridge.ignoreChats") for p in e.value.problems)

# -- paths no ordinary input reaches ---------------------------------------------------------------

class TestUnexpectedFailures:
    """The catch-alls and the retry loops behind them: each proven with an input or an injected dependency."""

    def test_a_row_the_worker_cannot_handle_is_parked_and_the_next_one_goes(self, make_bridge):
        h = make_bridge()
        # a queued row with fields of the wrong types (as a damaged or foreign row would be): an internal error
        h.app.store.enqueue("default", "w2s", "m:odd:1", ANNA, "message", {"id": 5, "body": {"x": 1}}, time.time())
        h.app.bridge.wake["w2s"].set()
        assert eventually(lambda: [r["state"] for r in queue_rows(h, "w2s")] == ["dead"])
        assert queue_rows(h, "w2s")[0]["error"].startswith("internal error (")
        errors = [r for r in h.logs.records() if r["msg"] == "internal error while delivering; item parked"]
        assert len(errors) == 1 and errors[0]["error"] and errors[0]["where"]
        post_event(h, wa_message(ANNA, "3EB0AFTER", "the worker lives on"))
        assert eventually(lambda: "+15550001111: the worker lives on" in h.texts())

    def test_an_internal_error_in_the_webhook_handler_is_a_500_without_internals(self, make_bridge):
        broken = threading.Event()

        def in_handler_thread():   # by the stack, not the thread's name (which names its target only from 3.10)
            f = sys._getframe()
            while f is not None and f.f_code.co_name != "process_request_thread":
                f = f.f_back
            return f is not None

        def clock():   # the injected clock fails, only in HTTP handler threads, while `broken` is set
            if broken.is_set() and in_handler_thread():
                raise RuntimeError("the clock broke /secret/path")
            return time.time()
        h = make_bridge(clock=clock)
        broken.set()
        try:
            status, headers, raw, js = post_signed(h, wa_message(ANNA, "3EB0BROKEN", "hi"))
        finally:
            broken.clear()
        assert (status, js) == (500, {"error": "internal error"})
        assert headers.get("Connection", "").lower() == "close"
        assert b"secret" not in raw and b"Traceback" not in raw
        errors = [r for r in h.logs.records() if r["msg"] == "internal error handling a webhook"]
        assert len(errors) == 1 and errors[0]["error"] == "RuntimeError" and "/secret/path" not in json.dumps(errors)
        assert post_signed(h, wa_message(ANNA, "3EB0FINE", "fine again"))[::3] == (200, {"status": "stored"})
        assert eventually(lambda: h.texts() == ["+15550001111: fine again"])

    def test_sent_but_the_database_cannot_record_it_is_retried_not_sent_again(self, make_bridge):
        h = make_bridge()
        with h.app.store.lock:
            h.app.store.db.execute("PRAGMA busy_timeout=100")
        blocker = sqlite3.connect(h.app.store.path, isolation_level=None, timeout=5, check_same_thread=False)
        real_send, released = h.signal._methods["send"], threading.Event()

        def send(params, rec):          # signal-cli takes the message; right then the database is locked
            result = real_send(params, rec)
            if not released.is_set():
                blocker.execute("BEGIN EXCLUSIVE")
            return result
        h.signal._methods["send"] = send
        try:
            post_event(h, wa_message(ANNA, "3EB0LOCK", "sent once"))
            assert eventually(lambda: [r for r in h.logs.records()
                                       if r["msg"] == "delivered, but the database cannot record it yet; retrying"])
        finally:
            released.set()
            blocker.execute("ROLLBACK")
            blocker.close()
        assert eventually(lambda: [r["state"] for r in queue_rows(h, "w2s")] == ["done"])
        assert h.texts() == ["+15550001111: sent once"]


class TestClientsAndTimers:
    def test_send_timestamp_reads_partial_results(self):
        ok = {"type": "SUCCESS", "recipientAddress": {"number": OWNER}}
        assert ws._send_timestamp({"timestamp": 5, "results": [ok]}, OWNER) == 5
        # a group send that reached some members is sent; the failures are the members' own
        assert ws._send_timestamp({"timestamp": 6, "results": [ok, {"type": "NETWORK_FAILURE"}]}, "group:abc") == 6
        for failure, error in (("IDENTITY_FAILURE", ws.IdentityError), ("UNREGISTERED_FAILURE", ws.PermanentError),
                               ("NETWORK_FAILURE", ws.TransientError), ("RATE_LIMIT_FAILURE", ws.TransientError)):
            with pytest.raises(error):
                ws._send_timestamp({"timestamp": 7, "results": [ok, {"type": failure}]}, OWNER)
        for answer in (None, [], {"results": [ok]}, {"timestamp": True}, {"timestamp": "8"}):
            with pytest.raises(ws.TransientError):
                ws._send_timestamp(answer, OWNER)

    def test_waha_message_id_of_every_engine(self):
        assert ws.WahaClient.message_id({"id": "true_%s_3EB0GO" % ANNA, "_data": {}}) == "true_%s_3EB0GO" % ANNA
        webjs = {"id": {"fromMe": True, "remote": ANNA, "id": "3EB0WJ", "_serialized": "true_%s_3EB0WJ" % ANNA}}
        assert ws.WahaClient.message_id(webjs) == "true_%s_3EB0WJ" % ANNA
        noweb = {"key": {"remoteJid": "15550001111@s.whatsapp.net", "fromMe": True, "id": "3EB0NW"},
                 "message": {"extendedTextMessage": {"text": "x"}}, "status": "PENDING"}
        assert ws.WahaClient.message_id(noweb) == "true_%s_3EB0NW" % ANNA
        for nothing in (None, [], {}, {"id": 5}, {"key": {"remoteJid": "nobody", "id": "X"}}, {"key": "x"}):
            assert ws.WahaClient.message_id(nothing) is None

    @pytest.mark.parametrize("backend", ["daemon", "rest"])
    def test_list_groups_of_the_bridge_account(self, make_bridge, backend):
        h = make_bridge(backend)
        made = h.signal.add_group("Family", [OWNER, "+15550000033"])
        client = h.app.bridge.signal
        groups = client.list_groups()
        want_id = made if backend == "daemon" else FakeSignalRest.internal_group_id(made)
        assert [(g["id"], g["name"], g["description"]) for g in groups] == [(want_id, "Family", "")]
        assert {OWNER, "+15550000033"} <= set(groups[0]["members"])

    def test_the_cleanup_timer_sweeps_and_comes_back(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge(clock=clock.time, raw_overrides={"cleanupIntervalHours": 0.0003})   # about a second
        for k in range(2):
            post_event(h, wa_message(ANNA, "3EB0OLD%d" % k, "old news %d" % k, timestamp=int(clock.time())))
            assert eventually(lambda: queue_count(h) == 1 and queue_rows(h, "w2s")[0]["state"] == "done")
            clock.advance(31 * 86400)                  # past retentionDays: the next tick removes it
            assert eventually(lambda: queue_count(h) == 0, 15), "tick %d never swept" % k
            assert eventually(lambda: json.loads(h.app.store.meta("last_cleanup") or "{}").get("at") == clock.time())
        text = http_get(h.url, "/metrics")[1]
        assert metric_value(text, "whatsignal_cleanup_last_success_timestamp_seconds") == pytest.approx(clock.time())


class TestViewOnceOddType:
    def test_a_view_once_flag_with_a_type_that_is_no_string_is_stored_not_a_500(self, make_bridge):
        h = bridge_with_contacts(make_bridge)
        for n, odd in enumerate(([], {"a": 1})):
            status, body = h.webhook(h.waha.event("message", wa_payload(ALICE_DE, "VOX%d" % n, "", _data={
                "isViewOnce": True, "type": odd})))
            assert (status, body) == (200, {"status": "stored"})
        settle_w2s(h)
        assert h.texts() == ["view-once media from Alice Example: open it on your phone"] * 2


###############################################################################
# Signal to WhatsApp, and the groups layout ###################################
###############################################################################

# ---------------------------------------------------------------------------
# Issue 4 (Signal -> WhatsApp) and issue 8 (groups layout).
# ---------------------------------------------------------------------------



OWNER2 = "+15550000003"
SMALL_JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x01" * 40
SMALL_OGG = b"OggS" + b"\x00\x02" + b"\x02" * 40
SMALL_PDF = b"%PDF-1.4\n" + b"%" * 40



def forward_to_signal(h, chat, body, participant=None, push=None, session="default", timeout=10.0):
    """Post a WhatsApp message and wait until its copy reached Signal; return (serialized id, Signal copy)."""
    ev = wa_message(chat, new_mid(), body, participant=participant, push=push, session=session)
    sid = ev["payload"]["id"]
    status, resp = h.webhook(ev)
    assert status == 200, resp
    match = lambda: [o for o in h.received() if o["text"] and o["text"].endswith(body)]
    assert eventually(lambda: match(), timeout), "message %r never reached Signal: %r" % (body, h.received())
    # the mapping is committed right after the send returns: wait for it too
    mine = lambda: [r for r in queue_rows(h, "w2s") if h.app.store.record_of(r).get("id") == sid]
    assert eventually(lambda: [r["state"] for r in mine()] == ["done"], timeout)
    return sid, match()[-1]


def waha_texts(h, chat=None):
    return [b for b in h.waha.sent("text") if chat is None or b["chatId"] == chat]


def settle_s2w(h, timeout=10.0):
    """Push a /to marker from the owner and wait for it: everything received before it was handled."""
    marker = "marker-" + uuid.uuid4().hex[:8]
    owner_push(h, "/to +15550000077 " + marker)
    assert eventually(lambda: any(b["text"] == marker for b in h.waha.sent("text")), timeout), \
        "the marker never reached WAHA"
    return marker


# ---------------------------------------------------------------------------
class TestReceiving:
    @pytest.mark.parametrize("name", ["signal-envelope-text-current-derived.json", "signal-envelope-text.json"])
    def test_sse_fixture_envelope_becomes_one_sendtext(self, make_bridge, name):
        h = make_bridge("daemon")
        sid, _ = forward_to_signal(h, ALICE, "are you there?")
        obj = signal_fixture(name)
        assert h.signal.push(obj)
        text = "Hello from Signal"
        assert eventually(lambda: waha_texts(h))
        settle_s2w(h)
        assert waha_texts(h, ALICE) == [{"session": "default", "chatId": ALICE, "text": text}]

    def test_rest_normal_mode_polls_and_delivers(self, make_bridge):
        h = make_bridge("rest")
        sid, _ = forward_to_signal(h, ALICE, "polling?")
        assert h.signal.push(signal_fixture("signal-envelope-text-current-derived.json"))
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": ALICE, "text": "Hello from Signal"}]
        polls = h.signal.calls_for("/v1/receive/", "GET")
        assert polls and all("timeout" in c["query"] for c in polls)

    def test_rest_json_rpc_mode_uses_websocket(self, make_bridge):
        h = make_bridge("rest-json-rpc")
        sid, _ = forward_to_signal(h, ALICE, "websocket?")
        assert h.signal.push(signal_fixture("signal-envelope-text-current-derived.json"))
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": ALICE, "text": "Hello from Signal"}]
        assert h.signal.dropped == 0
        upgrades = [c for c in h.signal.calls_for("/v1/receive/") if c["status"] == 101]
        assert len(upgrades) == 1

    def test_sse_cut_mid_event_reconnects_and_keeps_receiving(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "before the cut")
        half = envelope(text="half an event")
        assert h.signal.cut_mid_event(half) == 1
        assert h.signal.wait_for(lambda f: len(f.calls_for("/api/v1/events")) >= 2 and f.stream_connections == 1, 8)
        ts = owner_push(h, "after the cut")
        assert eventually(lambda: waha_texts(h))
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["after the cut"]
        assert "signal receive interrupted; reconnecting" in h.logs.text()

    def test_websocket_closed_without_close_frame_reconnects(self, make_bridge):
        h = make_bridge("rest-json-rpc")
        forward_to_signal(h, ALICE, "before the drop")
        assert h.signal.close_ws_abruptly() == 1
        assert h.signal.wait_for(
            lambda f: len([c for c in f.calls_for("/v1/receive/") if c["status"] == 101]) >= 2
            and f.ws_connections == 1, 8)
        owner_push(h, "after the drop")
        assert eventually(lambda: waha_texts(h, ALICE))
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["after the drop"]
        assert h.signal.dropped == 0

    def test_same_envelope_twice_acts_once(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "ping")
        obj = envelope(text="only once")
        assert h.signal.push(obj)
        assert eventually(lambda: waha_texts(h, ALICE))
        assert h.signal.push(copy.deepcopy(obj))
        # a redelivery with the same sender+timestamp but another body is the same envelope too
        again = copy.deepcopy(obj)
        again["envelope"]["dataMessage"]["message"] = "only once (redelivered)"
        assert h.signal.push(again)
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["only once"]
        assert len(queue_rows(h, "s2w")) == 2   # the envelope + the marker

    def test_restart_in_the_middle_loses_nothing(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "talk to me")
        h.waha.mode = "down"
        owner_push(h, "first")
        owner_push(h, "second")
        assert eventually(lambda: len(h.waha.calls_for("/api/sendText")) >= 1)
        assert eventually(lambda: len(queue_rows(h, "s2w", state="pending")) == 2)
        h.stop_app()
        owner_push(h, "third (sent while the bridge was away)")
        assert len(h.signal.pending) == 1      # held by the daemon (receive-mode on-connection)
        h.waha.mode = "ok"
        h.start(connected=True)
        assert eventually(lambda: len(waha_texts(h, ALICE)) >= 3, 10)
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == \
            ["first", "second", "third (sent while the bridge was away)"]
        assert not [t for t in h.texts(OWNER) if "Not delivered" in t]

    def test_clean_stop_of_the_sse_receiver_is_not_a_crash(self, make_bridge):
        h = make_bridge("daemon")
        for cycle in range(3):                      # the stop races the reader thread: try a few times
            if cycle:
                h.start()
            time.sleep(0.05)
            h.stop_app()
            errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
            assert errors == [], errors


# ---------------------------------------------------------------------------
class TestOwnerOnly:
    def test_stranger_is_ignored_logged_masked_and_counted(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello owner")
        owner_push(h, "I am not the owner", source="+15550000003", uuid_="b1c2d3e4-f5a6-4b1c-8d2e-3f4a5b6c7d8e")
        assert h.signal.push(signal_fixture("signal-envelope-group-derived.json", source=None))   # Bob, in a group
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]   # only the marker
        recs = [r for r in h.logs.records() if "unauthorized sender" in r["msg"]]
        assert len(recs) == 2
        assert all(r["sender"] == "+1555*****03" for r in recs)
        assert "15550000003" not in h.logs.text()
        assert "whatsignal_unauthorized_senders_total 2.0" in http_get(h.url, "/metrics")[1]

    def test_numbers_that_only_look_like_the_owner_are_ignored(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello owner")
        fakes = ["15550000002", "+1 555 000 0002", "+15550000002 ", " +15550000002", "+155500000020",
                 "+15550000002\u200b", "００15550000002", "tel:+15550000002"]
        for i, number in enumerate(fakes):
            owner_push(h, "spoof %d" % i, source=number, uuid_=str(uuid.uuid4()))
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]
        assert "whatsignal_unauthorized_senders_total %r" % float(len(fakes)) in http_get(h.url, "/metrics")[1]

    @pytest.mark.parametrize("name", ["signal-envelope-sync-sent-derived.json",
                                      "signal-envelope-sync-sent-group-derived.json",
                                      "signal-envelope-sync-sent.json"])
    def test_sync_messages_are_never_echoed(self, make_bridge, name):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello owner")
        assert h.signal.push(signal_fixture(name, source=None))
        owner_sync = signal_fixture(name, source=OWNER)   # even if it claimed to come from the owner
        assert h.signal.push(owner_sync)
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]
        assert len(queue_rows(h, "s2w")) == 1

    def test_hidden_number_with_owner_uuid_accepted_only_after_owner_seen(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello owner")
        owner_push(h, "hidden before seen", source=None)
        owner_push(h, "with number")          # the owner, number + UUID: now the UUID is known
        assert eventually(lambda: waha_texts(h, ALICE))
        owner_push(h, "hidden after seen", source=None)
        assert eventually(lambda: len(waha_texts(h, ALICE)) >= 2)
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["with number", "hidden after seen"]
        assert [r["sender"] for r in h.logs.records() if "unauthorized sender" in r["msg"]] == ["hidden number"]

    def test_hidden_number_with_another_uuid_is_ignored(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello owner")
        owner_push(h, "owner")
        assert eventually(lambda: waha_texts(h, ALICE))
        owner_push(h, "hidden stranger", source=None, uuid_="b1c2d3e4-f5a6-4b1c-8d2e-3f4a5b6c7d8e")
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["owner"]
        assert "whatsignal_unauthorized_senders_total 1.0" in http_get(h.url, "/metrics")[1]


# ---------------------------------------------------------------------------
class TestRouting:
    def test_quote_goes_to_that_chat_as_a_reply(self, each_backend):
        h = each_backend
        a_id, a_copy = forward_to_signal(h, ALICE, "Shall we meet at 6?")
        b_id, b_copy = forward_to_signal(h, BOB, "Lunch tomorrow?")
        assert a_copy["to"] == OWNER and a_copy["text"] == "Alice Example: Shall we meet at 6?"
        owner_push(h, "Yes, sounds good", quote={"id": a_copy["ts"], "author": BRIDGE, "authorNumber": BRIDGE,
                                               "text": a_copy["text"], "attachments": []})
        assert eventually(lambda: waha_texts(h))
        owner_push(h, "Sure", quote={"id": b_copy["ts"], "author": BRIDGE, "text": b_copy["text"]})
        assert eventually(lambda: len(waha_texts(h)) >= 2)
        settle_s2w(h)
        assert waha_texts(h)[:2] == [
            {"session": "default", "chatId": ALICE, "text": "Yes, sounds good", "reply_to": a_id},
            {"session": "default", "chatId": BOB, "text": "Sure", "reply_to": b_id}]
        assert len(waha_texts(h)) == 3

    def test_quote_reply_fixture(self, make_bridge):
        h = make_bridge("daemon")
        a_id, a_copy = forward_to_signal(h, ALICE, "Shall we meet at 6?")
        forward_to_signal(h, BOB, "something later")
        obj = signal_fixture("signal-envelope-quote-reply-derived.json")
        obj["envelope"]["dataMessage"]["quote"]["id"] = a_copy["ts"]
        assert h.signal.push(obj)
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": ALICE, "text": "Yes, sounds good",
                                      "reply_to": a_id}]

    def test_no_quote_goes_to_the_most_recent_forwarded_chat(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "one")
        forward_to_signal(h, BOB, "two")
        owner_push(h, "plain answer")
        assert eventually(lambda: waha_texts(h))
        forward_to_signal(h, ALICE, "three")
        owner_push(h, "second plain answer")
        assert eventually(lambda: len(waha_texts(h)) >= 2)
        assert waha_texts(h) == [{"session": "default", "chatId": BOB, "text": "plain answer"},
                                     {"session": "default", "chatId": ALICE, "text": "second plain answer"}]

    def test_quote_of_an_unknown_message_tells_the_owner(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello")
        before = len(h.received())
        ts = owner_push(h, "answer to what?", quote={"id": 1700000000000, "author": BRIDGE, "text": "old"})
        assert eventually(lambda: len(h.received()) > before)
        settle_s2w(h)
        notices = h.received()[before:]
        assert len(notices) == 1
        n = notices[0]
        assert n["to"] == OWNER and n["quote_ts"] == ts and n["quote_author"] == OWNER
        assert "don't know which WhatsApp chat" in n["text"] and "/to" in n["text"]
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]   # only the marker

    def test_owner_message_in_an_unrelated_signal_group_is_not_bridged(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello")
        assert h.signal.push(signal_fixture("signal-envelope-group-derived.json", source=OWNER))
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]


# ---------------------------------------------------------------------------
class TestCommands:
    def command_reply(self, h, text, before):
        owner_push(h, text)
        assert eventually(lambda: len(h.received()) > before), "no answer to %r" % text
        return h.received()[before]

    def test_help(self, make_bridge):
        h = make_bridge("daemon")
        r = self.command_reply(h, "/help", 0)
        assert r["to"] == OWNER
        for cmd in ("/chats", "/to <n|+number|name> <text>", "/status", "/help", "without a quote"):
            assert cmd in r["text"]
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]

    def test_chats_lists_short_numbers_and_names(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "a")
        forward_to_signal(h, BOB, "b")
        forward_to_signal(h, FAMILY, "c", participant=DORA)
        n = len(h.received())
        r = self.command_reply(h, "/chats", n)
        lines = r["text"].split("\n")
        assert lines[0].startswith("Recent chats")
        assert set(lines[1:]) == {"1. Alice Example (+15550000010)", "2. Bob Builder (+15550000011)",
                                  "3. Family (group)"}
        assert lines[1] == "3. Family (group)"   # most recent first
        assert h.waha.sent() == []

    def test_to_short_number(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "a")
        forward_to_signal(h, BOB, "b")
        owner_push(h, "/to 1 hello Alice, via /to")
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": ALICE, "text": "hello Alice, via /to"}]

    def test_to_new_number_starts_a_chat(self, make_bridge):
        h = make_bridge("daemon")
        owner_push(h, "/to +447700900123 Hi, this is new")
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": "447700900123@c.us", "text": "Hi, this is new"}]
        # an answer without a quote does not go there: it was no forwarded message
        n = len(h.received())
        owner_push(h, "/to +12 bad")
        assert eventually(lambda: len(h.received()) > n)
        assert "+E.164" in h.received()[n]["text"]

    def test_to_by_name_single_and_multi_word(self, make_bridge):
        h = make_bridge("daemon")
        h.waha.contacts[CAROL] = "Alice Cooper"
        forward_to_signal(h, ALICE, "a")
        forward_to_signal(h, BOB, "b")
        forward_to_signal(h, CAROL, "c")
        owner_push(h, "/to Bob hi Bob")
        owner_push(h, "/to Alice Example see you at 6")
        owner_push(h, "/to alice cooper rock on")
        assert eventually(lambda: len(waha_texts(h)) >= 3)
        assert waha_texts(h) == [
            {"session": "default", "chatId": BOB, "text": "hi Bob"},
            {"session": "default", "chatId": ALICE, "text": "see you at 6"},
            {"session": "default", "chatId": CAROL, "text": "rock on"}]

    def test_to_ambiguous_name_offers_choices(self, make_bridge):
        h = make_bridge("daemon")
        h.waha.contacts[CAROL] = "Alice Cooper"
        forward_to_signal(h, ALICE, "a")
        forward_to_signal(h, CAROL, "c")
        n = len(h.received())
        ts = owner_push(h, "/to Alice hello")
        assert eventually(lambda: len(h.received()) > n)
        r = h.received()[n]
        assert r["quote_ts"] == ts
        assert "1. Alice Example" in r["text"] and "2. Alice Cooper" in r["text"] and "several" in r["text"]
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]

    def test_status(self, make_bridge):
        h = make_bridge("daemon")
        ev = h.waha.event("session.status", {"name": "default", "status": "WORKING"})
        assert h.webhook(ev)[0] == 200
        assert eventually(lambda: h.app.store.state("default", "session_status") == "WORKING")
        settle_w2s(h)        # the status event's own item recorded as delivered, not only acted on
        r = self.command_reply(h, "/status", len(h.received()))
        assert r["to"] == OWNER
        assert "WhatSignal " + ws.__version__ in r["text"]
        assert "WhatsApp session default: WORKING" in r["text"]
        assert "Waiting for Signal: 0, for WhatsApp: " in r["text"]
        assert h.waha.sent() == []

    def test_unknown_command_gets_help_and_no_whatsapp_message(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hello")
        n = len(h.received())
        ts = owner_push(h, "/frobnicate now")
        assert eventually(lambda: len(h.received()) > n)
        r = h.received()[n]
        assert r["text"].startswith("Unknown command /frobnicate")
        assert ws.HELP_TEXT in r["text"] and r["quote_ts"] == ts
        settle_s2w(h)
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]


# ---------------------------------------------------------------------------
class TestOwnerActions:
    def test_reaction_and_its_removal_on_a_forwarded_message(self, each_backend):
        h = each_backend
        a_id, a_copy = forward_to_signal(h, ALICE, "Shall we meet at 6?")
        forward_to_signal(h, BOB, "later message")
        obj = signal_fixture("signal-envelope-reaction-derived.json")
        obj["envelope"]["dataMessage"]["reaction"]["targetSentTimestamp"] = a_copy["ts"]
        assert h.signal.push(obj)
        reactions = lambda: [c["json"] for c in h.waha.calls_for("/api/reaction", "PUT") if c["status"] == 200]
        assert eventually(lambda: reactions())
        removal = signal_fixture("signal-envelope-reaction-derived.json")
        removal["envelope"]["dataMessage"]["reaction"].update(targetSentTimestamp=a_copy["ts"], isRemove=True)
        assert h.signal.push(removal)
        assert eventually(lambda: len(reactions()) >= 2)
        settle_s2w(h)
        assert reactions() == [{"session": "default", "messageId": a_id, "reaction": "\U0001F44D"},
                               {"session": "default", "messageId": a_id, "reaction": ""}]
        assert [b["chatId"] for b in h.waha.sent()] == ["15550000077@c.us"]

    def test_reaction_on_a_group_message_keeps_the_participant(self, make_bridge):
        h = make_bridge("daemon")
        g_id, g_copy = forward_to_signal(h, FAMILY, "Hi everyone", participant=DORA)
        owner_push(h, None, reaction={"emoji": "\u2764\ufe0f", "targetAuthor": BRIDGE,
                                    "targetSentTimestamp": g_copy["ts"], "isRemove": False})
        assert eventually(lambda: h.waha.calls_for("/api/reaction"))
        c = h.waha.calls_for("/api/reaction")[0]
        assert c["status"] == 200, c["response"]
        assert c["json"]["messageId"] == g_id and g_id.endswith("_" + DORA)

    def owner_message(self, h, chat, text):
        """The owner writes *text* (routed to *chat*); return (its Signal ts, the WhatsApp id WAHA gave it)."""
        n = len(h.waha.calls_for("/api/sendText"))
        ts = owner_push(h, text)
        assert eventually(lambda: len(h.waha.calls_for("/api/sendText")) > n)
        c = h.waha.calls_for("/api/sendText")[n]
        assert c["json"]["chatId"] == chat and c["json"]["text"] == text
        return ts, c["wa_id"]

    def test_remote_delete_of_the_owners_message_deletes_it_on_whatsapp(self, each_backend):
        h = each_backend
        forward_to_signal(h, ALICE, "hi")
        ts, wa_id = self.owner_message(h, ALICE, "oops, wrong chat")
        obj = signal_fixture("signal-envelope-remote-delete-derived.json")
        obj["envelope"]["dataMessage"]["remoteDelete"]["timestamp"] = ts
        assert h.signal.push(obj)
        assert eventually(lambda: h.waha.calls_for("/api/default/chats/", "DELETE"))
        settle_s2w(h)
        dels = h.waha.calls_for("/api/default/chats/", "DELETE")
        assert [(c["chatId"], c["messageId"], c["status"]) for c in dels] == [(ALICE, wa_id, 200)]

    def test_remote_delete_of_a_forwarded_message_does_nothing_on_whatsapp(self, make_bridge):
        h = make_bridge("daemon")
        a_id, a_copy = forward_to_signal(h, ALICE, "not yours to delete")
        owner_push(h, None, remoteDelete={"timestamp": a_copy["ts"]})
        settle_s2w(h)
        assert h.waha.calls_for("/api/default/chats/", "DELETE") == []

    def test_edit_of_the_owners_message_edits_it_on_whatsapp(self, each_backend):
        h = each_backend
        forward_to_signal(h, ALICE, "hi")
        ts, wa_id = self.owner_message(h, ALICE, "Hello from Signal")
        obj = signal_fixture("signal-envelope-edit-derived.json")
        obj["envelope"]["editMessage"]["targetSentTimestamp"] = ts
        assert h.signal.push(obj)
        assert eventually(lambda: h.waha.calls_for("/api/default/chats/", "PUT"))
        settle_s2w(h)
        edits = h.waha.calls_for("/api/default/chats/", "PUT")
        assert [(c["chatId"], c["messageId"], c["json"], c["status"]) for c in edits] == \
            [(ALICE, wa_id, {"text": "Hello from Signal (edited)"}, 200)]

    def test_edit_of_a_to_command_edits_only_the_text(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "a")
        forward_to_signal(h, BOB, "b")
        ts = owner_push(h, "/to 1 see you at 6")
        assert eventually(lambda: waha_texts(h))
        wa_id = h.waha.calls_for("/api/sendText")[0]["wa_id"]
        obj = signal_fixture("signal-envelope-edit-derived.json")
        obj["envelope"]["editMessage"]["targetSentTimestamp"] = ts
        obj["envelope"]["editMessage"]["dataMessage"]["message"] = "/to 1 see you at 7"
        assert h.signal.push(obj)
        assert eventually(lambda: h.waha.calls_for("/api/default/chats/", "PUT"))
        edit = h.waha.calls_for("/api/default/chats/", "PUT")[0]
        assert (edit["chatId"], edit["messageId"]) == (ALICE, wa_id)
        assert edit["json"] == {"text": "see you at 7"}     # never the command syntax on WhatsApp

    def test_read_receipt_marks_the_chats_seen(self, make_bridge):
        h = make_bridge("daemon")
        a1, c1 = forward_to_signal(h, ALICE, "first")
        a2, c2 = forward_to_signal(h, ALICE, "second")
        b1, c3 = forward_to_signal(h, BOB, "third")
        obj = signal_fixture("signal-envelope-receipt-derived.json")
        obj["envelope"]["receiptMessage"]["timestamps"] = [c1["ts"], c2["ts"], c3["ts"], 1700000000000]
        assert h.signal.push(obj)
        seen = lambda: h.waha.sent("seen")
        assert eventually(lambda: len(seen()) >= 2)
        settle_s2w(h)
        assert sorted(seen(), key=lambda b: b["chatId"]) == [
            {"session": "default", "chatId": ALICE, "messageIds": [a1, a2]},
            {"session": "default", "chatId": BOB, "messageIds": [b1]}]
        # a delivery receipt (not read) marks nothing
        obj = signal_fixture("signal-envelope-receipt-derived.json")
        obj["envelope"]["receiptMessage"].update(isRead=False, isDelivery=True, timestamps=[c1["ts"]])
        assert h.signal.push(obj)
        settle_s2w(h)
        assert len(seen()) == 2

    def test_typing_starts_and_stops_whatsapp_typing(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, BOB, "typing?")
        assert h.signal.push(signal_fixture("signal-envelope-typing-derived.json"))
        stopped = signal_fixture("signal-envelope-typing-derived.json")
        stopped["envelope"]["typingMessage"]["action"] = "STOPPED"
        assert h.signal.push(stopped)
        assert eventually(lambda: h.waha.calls_for("/api/stopTyping"))
        assert [(c["path"], c["json"]["chatId"]) for c in h.waha.calls if "Typing" in c["path"]] == \
            [("/api/startTyping", BOB), ("/api/stopTyping", BOB)]

    def test_several_attachments_each_sent_with_the_right_endpoint(self, each_backend):
        h = each_backend
        forward_to_signal(h, ALICE, "send me the files")
        h.signal.attachments.update({"att-1.jpg": SMALL_JPEG, "att-2.ogg": SMALL_OGG, "att-3.pdf": SMALL_PDF})
        atts = [{"contentType": "image/jpeg", "filename": None, "id": "att-1.jpg", "size": len(SMALL_JPEG)},
                {"contentType": "audio/ogg", "filename": None, "id": "att-2.ogg", "size": len(SMALL_OGG)},
                {"contentType": "application/pdf", "filename": "report.pdf", "id": "att-3.pdf",
                 "size": len(SMALL_PDF)}]
        owner_push(h, "Look at this", attachments=atts)
        assert eventually(lambda: len(h.waha.sent()) >= 3)
        settle_s2w(h)
        media = [c for c in h.waha.calls if c["path"] in ("/api/sendImage", "/api/sendVoice", "/api/sendFile",
                                                           "/api/sendVideo", "/api/sendText")]
        assert [c["path"] for c in media] == ["/api/sendImage", "/api/sendVoice", "/api/sendFile", "/api/sendText"]
        img, voice, doc = media[0]["json"], media[1]["json"], media[2]["json"]
        assert media[3]["json"]["text"].startswith("marker-")      # no extra text message
        assert all(c["status"] == 201 for c in media)
        assert {b["chatId"] for b in (img, voice, doc)} == {ALICE}
        assert base64.b64decode(img["file"]["data"]) == SMALL_JPEG and img["file"]["mimetype"] == "image/jpeg"
        assert base64.b64decode(voice["file"]["data"]) == SMALL_OGG and voice["file"]["mimetype"] == "audio/ogg"
        assert base64.b64decode(doc["file"]["data"]) == SMALL_PDF and doc["file"]["mimetype"] == "application/pdf"
        assert doc["file"]["filename"] == "report.pdf"
        assert img.get("caption") == "Look at this"
        assert not voice.get("caption") and not doc.get("caption")

    def test_attachment_fixture_photo_with_caption(self, make_bridge):
        h = make_bridge("daemon")
        a_id, a_copy = forward_to_signal(h, ALICE, "photo please")
        obj = signal_fixture("signal-envelope-attachment-derived.json")
        att = obj["envelope"]["dataMessage"]["attachments"][0]
        h.signal.attachments[att["id"]] = SMALL_JPEG
        obj["envelope"]["dataMessage"]["quote"] = {"id": a_copy["ts"], "author": BRIDGE, "text": a_copy["text"]}
        assert h.signal.push(obj)
        assert eventually(lambda: h.waha.sent("image"))
        assert h.waha.sent("image")[0]["chatId"] == ALICE
        assert h.waha.sent("image")[0]["caption"] == "Look at this"
        assert h.waha.sent("image")[0]["reply_to"] == a_id
        assert base64.b64decode(h.waha.sent("image")[0]["file"]["data"]) == SMALL_JPEG

    @pytest.mark.parametrize("att_id", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd"])
    def test_attachment_id_is_never_a_file_path_rest(self, make_bridge, att_id):
        h = make_bridge("rest")
        forward_to_signal(h, ALICE, "hi")
        ts = owner_push(h, "see attached", attachments=[{"contentType": "application/pdf", "id": att_id,
                                                       "filename": "passwd", "size": 100}])
        notice = lambda: [o for o in h.received() if o["to"] == OWNER and o["quote_ts"] == ts]
        assert eventually(lambda: notice())
        assert "Not delivered to WhatsApp" in notice()[0]["text"]
        assert [c["path"] for c in h.signal.calls if "attachments" in c["path"]] == []
        assert h.waha.sent() == []

    def test_attachment_id_is_never_a_file_path_rpc(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hi")
        ts = owner_push(h, "see attached", attachments=[{"contentType": "application/pdf", "id": "../../etc/passwd",
                                                       "filename": "passwd", "size": 100}])
        notice = lambda: [o for o in h.received() if o["to"] == OWNER and o["quote_ts"] == ts]
        assert eventually(lambda: notice())
        # only ever asked signal-cli for it by id (never opened as a file), and nothing went to WhatsApp
        assert [r["params"] for r in h.signal.requests("getAttachment")] == [
            {"id": "../../etc/passwd", "account": BRIDGE}]
        assert h.waha.sent() == []


# ---------------------------------------------------------------------------
class TestTellingTheOwner:
    def test_waha_refusal_is_reported_quoting_the_owners_message(self, each_backend):
        h = each_backend
        forward_to_signal(h, ALICE, "hi")
        h.waha.refuse["/api/sendText"] = (400, "chatId does not exist")
        n = len(h.received())
        ts = owner_push(h, "this will bounce")
        assert eventually(lambda: len(h.received()) > n)
        notices = h.received()[n:]
        assert len(notices) == 1
        note = notices[0]
        assert note["to"] == OWNER and note["group"] is None
        assert note["quote_ts"] == ts and note["quote_author"] == OWNER
        assert note["text"].startswith("Not delivered to WhatsApp: ")
        assert "chatId does not exist" in note["text"] and "\n" not in note["text"]
        assert len(h.waha.calls_for("/api/sendText")) == 1           # not retried
        assert [r["state"] for r in queue_rows(h, "s2w")] == ["dead"]
        assert "whatsignal_dead_letters_total" in http_get(h.url, "/metrics")[1]

    def test_media_refused_by_waha_is_reported(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "hi")
        h.waha.refuse["/api/sendImage"] = (400, "file.mimetype is not supported")
        h.signal.attachments["p.jpg"] = SMALL_JPEG
        ts = owner_push(h, "pic", attachments=[{"contentType": "image/jpeg", "id": "p.jpg", "size": len(SMALL_JPEG)}])
        notice = lambda: [o for o in h.received() if o["quote_ts"] == ts]
        assert eventually(lambda: notice())
        assert notice()[0]["quote_author"] == OWNER
        assert "file.mimetype is not supported" in notice()[0]["text"]

    def test_waha_down_is_retried_silently_then_delivered_once(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time)
        forward_to_signal(h, ALICE, "hi")
        n = len(h.received())
        h.waha.mode = "down"
        owner_push(h, "patience")
        for attempt in (1, 2, 3):                 # tried, and retried with backoff: no notice for a delay
            assert eventually(lambda: [r["attempts"] for r in queue_rows(h, "s2w")] == [attempt])
            assert len(h.waha.calls_for("/api/sendText")) == attempt
            row = queue_rows(h, "s2w")[0]
            assert row["state"] == "pending" and row["next_at"] > clock.time()
            clock.advance(row["next_at"] - clock.time() + 0.01)
            if attempt < 3:
                h.app.bridge.wake["s2w"].set()
        assert len(h.received()) == n
        h.waha.mode = "ok"
        h.app.bridge.wake["s2w"].set()
        assert eventually(lambda: waha_texts(h))
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["patience"]
        assert len(h.received()) == n
        assert eventually(lambda: [r["state"] for r in queue_rows(h, "s2w")] == ["done", "done"])

    def test_a_message_delayed_past_the_expiry_is_given_up_and_reported(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time)
        forward_to_signal(h, ALICE, "hi")
        h.waha.mode = "down"
        ts = owner_push(h, "too late")
        assert eventually(lambda: [r["attempts"] for r in queue_rows(h, "s2w")] == [1])
        assert not [o for o in h.received() if o["quote_ts"] == ts]
        clock.advance(25 * 3600)
        h.app.bridge.wake["s2w"].set()
        notice = lambda: [o for o in h.received() if o["quote_ts"] == ts]
        assert eventually(lambda: notice())
        assert notice()[0]["text"].startswith("Not delivered to WhatsApp: gave up after 24 hours")
        assert notice()[0]["quote_author"] == OWNER
        assert queue_rows(h, "s2w")[0]["state"] == "dead"


# ---------------------------------------------------------------------------
TWO_CHANNELS = {"channels": [{"whatsappSession": "default", "signalDestination": OWNER},
                             {"whatsappSession": "work", "signalDestination": OWNER2}]}
OWNER2_UUID = "b1c2d3e4-f5a6-4b1c-8d2e-3f4a5b6c7d8e"


class TestMultiChannel:
    @pytest.fixture
    def two_channels(self, make_bridge):
        h = make_bridge("daemon", raw_overrides=dict(TWO_CHANNELS))
        self.a_id, self.a_copy = forward_to_signal(h, ALICE, "private hello", session="default")
        self.c_id, self.c_copy = forward_to_signal(h, CAROL, "work hello", session="work")
        assert self.a_copy["to"] == OWNER and self.c_copy["to"] == OWNER2
        return h

    def test_each_owners_reply_goes_out_on_its_own_session(self, two_channels):
        h = two_channels
        owner_push(h, "reply from work owner", source=OWNER2, uuid_=OWNER2_UUID)
        owner_push(h, "reply from private owner")
        assert eventually(lambda: len(waha_texts(h)) >= 2)
        got = sorted(waha_texts(h), key=lambda b: b["session"])
        assert got == [{"session": "default", "chatId": ALICE, "text": "reply from private owner"},
                       {"session": "work", "chatId": CAROL, "text": "reply from work owner"}]

    def test_quotes_and_commands_stay_inside_the_channel(self, two_channels):
        h = two_channels
        owner_push(h, "/chats", source=OWNER2, uuid_=OWNER2_UUID)
        owner_push(h, "/chats")
        assert eventually(lambda: len([t for t in h.texts(OWNER2) if t.startswith("Recent")]) == 1
                      and len([t for t in h.texts(OWNER) if t.startswith("Recent")]) == 1)
        work = [t for t in h.texts(OWNER2) if t.startswith("Recent")][0]
        private = [t for t in h.texts(OWNER) if t.startswith("Recent")][0]
        assert "Carol Work" in work and "Alice" not in work
        assert "Alice Example" in private and "Carol" not in private
        # the work owner quoting the private owner's copy reaches nothing on WhatsApp
        n = len(h.texts(OWNER2))
        ts = owner_push(h, "sneaky", source=OWNER2, uuid_=OWNER2_UUID, quote={"id": self.a_copy["ts"], "author": BRIDGE, "text": "x"})
        assert eventually(lambda: len(h.texts(OWNER2)) > n)
        note = [o for o in h.received() if o["quote_ts"] == ts][0]
        assert note["to"] == OWNER2 and note["quote_author"] == OWNER2
        # /to by short number resolves within the channel: work's chat 1 is Carol
        owner_push(h, "/to 1 via number", source=OWNER2, uuid_=OWNER2_UUID)
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "work", "chatId": CAROL, "text": "via number"}]
        assert not [t for t in h.texts(OWNER) if "know which" in t]


# ---------------------------------------------------------------------------


def created_groups(h):
    """Groups the bridge created on Signal: [{"name", "members", "description"}] (both backends)."""
    if isinstance(h.signal, FakeSignalDaemon):
        return [{"name": r["params"].get("name"), "members": r["params"].get("member") or r["params"].get("members"),
                 "description": r["params"].get("description")}
                for r in h.signal.requests("updateGroup") if r.get("created")]
    return [{"name": c["json"].get("name"), "members": c["json"].get("members"),
             "description": c["json"].get("description")}
            for c in h.signal.calls_for("/v1/groups/", "POST") if c["status"] == 201]


def group_renames(h):
    return [r["params"] for r in h.signal.requests("updateGroup") if r["error"] is None and not r.get("created")]


class TestGroupsLayout:
    @pytest.mark.parametrize("kind", ["daemon", "rest"])
    def test_three_chats_become_three_groups_and_answers_need_no_quote(self, make_bridge, kind):
        h = make_bridge(kind, layout="groups")
        a1_id, a1 = forward_to_signal(h, ALICE, "hello from Alice")
        b1_id, b1 = forward_to_signal(h, BOB, "hello from Bob")
        f1_id, f1 = forward_to_signal(h, FAMILY, "hi all", participant=DORA)
        a2_id, a2 = forward_to_signal(h, ALICE, "Alice again")
        f2_id, f2 = forward_to_signal(h, FAMILY, "dinner?", participant=DORA)
        created = created_groups(h)
        assert [g["name"] for g in created] == ["Alice Example", "Bob Builder", "Family (WhatsApp)"]
        assert all(g["members"] == [OWNER] for g in created)
        groups = {a1["group"], b1["group"], f1["group"]}
        assert len(groups) == 3 and None not in groups
        assert a2["group"] == a1["group"] and f2["group"] == f1["group"]
        assert all(o["to"] is None for o in (a1, b1, f1, a2, f2))          # nothing in the 1:1 chat
        assert (a1["text"], b1["text"], a2["text"]) == ("hello from Alice", "hello from Bob", "Alice again")
        assert (f1["text"], f2["text"]) == ("Dora Family: hi all", "Dora Family: dinner?")
        # the owner answers in each group without quoting
        for gid, text in ((b1["group"], "to Bob"), (f1["group"], "to the family"), (a1["group"], "to Alice")):
            assert h.signal.push(group_envelope(new_ts(), text, gid))
        assert eventually(lambda: len(waha_texts(h)) >= 3)
        assert sorted((b["chatId"], b["text"], b.get("reply_to")) for b in waha_texts(h)) == sorted(
            [(BOB, "to Bob", None), (FAMILY, "to the family", None), (ALICE, "to Alice", None)])
        assert len(created_groups(h)) == 3
        assert h.texts(OWNER) == []

    def test_concurrent_webhooks_for_a_new_chat_create_one_group(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        events = [wa_message(BOB, new_mid(), "burst %d" % i) for i in range(6)]
        results = []
        threads = [threading.Thread(target=lambda e=e: results.append(h.webhook(e)[0])) for e in events]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200] * 6
        assert eventually(lambda: len([o for o in h.received() if (o["text"] or "").startswith("burst")]) == 6)
        copies = [o for o in h.received() if (o["text"] or "").startswith("burst")]
        assert len({o["group"] for o in copies}) == 1
        assert [g["name"] for g in created_groups(h)] == ["Bob Builder"]

    def test_quote_in_a_group_becomes_a_whatsapp_reply(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        a1_id, a1 = forward_to_signal(h, ALICE, "first question")
        a2_id, a2 = forward_to_signal(h, ALICE, "second question")
        b1_id, b1 = forward_to_signal(h, BOB, "Bob's question")
        assert h.signal.push(group_envelope(new_ts(), "answer to the first", a1["group"], quote={"id": a1["ts"], "author": BRIDGE, "text": a1["text"]}))
        assert eventually(lambda: waha_texts(h))
        # quoting another chat's message inside Alice's group still writes to Alice, as a plain message
        assert h.signal.push(group_envelope(new_ts(), "odd quote", a1["group"], quote={"id": b1["ts"], "author": BRIDGE, "text": b1["text"]}))
        assert eventually(lambda: len(waha_texts(h)) >= 2)
        assert waha_texts(h) == [
            {"session": "default", "chatId": ALICE, "text": "answer to the first", "reply_to": a1_id},
            {"session": "default", "chatId": ALICE, "text": "odd quote"}]

    def test_reactions_land_on_the_copy_in_its_group(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "react to me")
        forward_to_signal(h, BOB, "other chat")
        # WhatsApp -> Signal: Alice reacts to her message -> a reaction on its copy, in Alice's group
        ev = h.waha.event("message.reaction", {
            "id": "false_%s_R1" % ALICE, "from": ALICE, "fromMe": False, "participant": ALICE,
            "timestamp": int(time.time()), "reaction": {"text": "\U0001F64F", "messageId": a_id}})
        assert h.webhook(ev)[0] == 200
        assert eventually(lambda: h.signal.requests("sendReaction"))
        r = h.signal.requests("sendReaction")[0]
        assert r["error"] is None
        assert r["params"].get("groupId") == a["group"] and not r["params"].get("recipient")
        assert (r["emoji"], r["target_author"], r["target_timestamp"]) == ("\U0001F64F", BRIDGE, a["ts"])
        # Signal -> WhatsApp: the owner reacts to the copy in the group
        assert h.signal.push(envelope(None, None, reaction={
            "emoji": "\U0001F44D", "targetAuthor": BRIDGE, "targetSentTimestamp": a["ts"], "isRemove": False}, groupInfo={"groupId": a["group"], "type": "DELIVER"}))
        assert eventually(lambda: h.waha.calls_for("/api/reaction"))
        assert [c["json"] for c in h.waha.calls_for("/api/reaction")] == [
            {"session": "default", "messageId": a_id, "reaction": "\U0001F44D"}]

    def test_rename_after_a_day_renames_the_group_once(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time, layout="groups")
        t0 = clock.time()
        a_id, a = forward_to_signal(h, ALICE, "day one")
        gid = a["group"]
        assert h.signal.groups[gid]["name"] == "Alice Example"
        h.waha.contacts[ALICE] = "Alice Renamed"
        # 23 h later the new name is seen (the cached name is made stale) but the group was named < 1 day ago
        clock.advance(23 * 3600)
        h.app.bridge.names.clear()
        h.app.store.set_contact("default", ALICE, "Alice Example", t0 - 2 * 3600)
        forward_to_signal(h, ALICE, "day one, late")
        assert group_renames(h) == []
        # past a day since the group got its name: one rename, then none for the next messages
        clock.advance(2 * 3600)
        forward_to_signal(h, ALICE, "day two")
        forward_to_signal(h, ALICE, "day two again")
        assert group_renames(h) == [{"groupId": gid, "name": "Alice Renamed", "account": BRIDGE}]
        assert h.signal.groups[gid]["name"] == "Alice Renamed"
        assert len(created_groups(h)) == 1
        assert {o["group"] for o in h.received()} == {gid}

    def test_owner_leaving_a_group_holds_its_messages_until_reopen(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "before leaving")
        gid = a["group"]
        h.signal.groups[gid]["members"].remove(OWNER)
        assert h.signal.push(envelope(None, None, groupInfo={"groupId": gid, "type": "UPDATE", "revision": 2}))
        assert eventually(lambda: [t for t in h.texts(OWNER) if "You left" in t], 3), \
            "no notice after the owner left the group: %r" % h.texts(OWNER)
        note = [t for t in h.texts(OWNER) if "You left" in t][0]
        assert "Alice Example" in note and "/reopen Alice Example" in note
        self.held_then_reopened(h, gid)

    def test_held_messages_of_a_left_chat_are_released_by_reopen(self, make_bridge):
        # the same, with the 'left' state recorded directly (independent of how the leave was detected)
        h = make_bridge("daemon", layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "before leaving")
        gid = a["group"]
        h.signal.groups[gid]["members"].remove(OWNER)
        g = h.app.store.group_of_chat("default", ALICE)
        h.app.store.save_group("default", ALICE, time.time(), "left", g["tag"], g["group"], g["name"])
        self.held_then_reopened(h, gid)

    def test_to_a_chat_whose_group_was_left_never_blocks_the_owner(self, make_bridge):
        """/to a closed chat is refused with a hint; it must not sit in the owner's queue ahead of /reopen."""
        h = make_bridge("daemon", layout="groups")
        forward_to_signal(h, ALICE, "before leaving")
        g = h.app.store.group_of_chat("default", ALICE)
        h.app.store.save_group("default", ALICE, time.time(), "left", g["tag"], g["group"], g["name"])
        owner_push(h, "/to Alice Example are you there")
        owner_push(h, "/reopen Alice Example")
        assert eventually(lambda: any(t.startswith("Reopened") for t in h.texts(OWNER)))
        assert "You left that chat's Signal group; /reopen Alice Example first." in h.texts(OWNER)
        assert not [b for b in waha_texts(h) if b["text"] == "are you there"]
        assert eventually(lambda: queue_rows(h, "s2w", "pending") == [])

    def held_then_reopened(self, h, gid):
        ev1 = wa_message(ALICE, new_mid(), "while away 1")
        ev2 = wa_message(ALICE, new_mid(), "while away 2")
        assert h.webhook(ev1)[0] == 200 and h.webhook(ev2)[0] == 200
        assert eventually(lambda: [r["attempts"] for r in queue_rows(h, "w2s", "pending")][:1] == [1])
        forward_to_signal(h, BOB, "Bob is not affected")      # the worker passed the held chat: not retried in a loop
        pend = queue_rows(h, "w2s", "pending")
        assert len(pend) == 2 and pend[0]["attempts"] <= 2 and pend[0]["next_at"] > time.time() + 60
        assert not [o for o in h.received() if (o["text"] or "").startswith("while away")]
        assert len(created_groups(h)) == 2             # Alice's group was not re-created on its own
        owner_push(h, "/reopen Alice Example")
        assert eventually(lambda: len([o for o in h.received() if (o["text"] or "").startswith("while away")]) == 2)
        created = created_groups(h)
        assert [g["name"] for g in created] == ["Alice Example", "Bob Builder", "Alice Example"]
        copies = [o for o in h.received() if (o["text"] or "").startswith("while away")]
        assert [o["text"] for o in copies] == ["while away 1", "while away 2"]
        new_gid = copies[0]["group"]
        assert new_gid not in (None, gid) and copies[1]["group"] == new_gid
        assert [t for t in h.texts(OWNER) if t.startswith("Reopened")] == \
            ["Reopened 'Alice Example' in a new Signal group; 2 held message(s) follow."]
        assert eventually(lambda: queue_rows(h, "w2s", "pending") == [])

    def test_a_burst_of_new_chats_is_paced_and_nothing_is_lost(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time, raw_overrides={"bridge": {"layout": "groups",
                                                                         "groupCreatePerMinute": 2.0}})
        chats = ["1555009%04d@c.us" % i for i in range(20)]
        for i, chat in enumerate(chats):
            assert h.webhook(wa_message(chat, new_mid(), "burst message %d" % i))[0] == 200
        assert eventually(lambda: len(created_groups(h)) == 5)
        assert eventually(lambda: all(r["attempts"] >= 1 for r in queue_rows(h, "w2s", "pending")))
        assert len(created_groups(h)) == 5                  # at most 5 at once
        pend = queue_rows(h, "w2s", "pending")
        assert len(pend) == 15
        assert all(r["next_at"] > clock.time() for r in pend)     # paced: each waits for its turn
        assert all("pacing" in (r["error"] or "") for r in pend)
        # half a minute later: one more group at 2 per minute
        clock.advance(30.5)
        h.app.bridge.wake["w2s"].set()
        assert eventually(lambda: len(created_groups(h)) == 6)
        for expected in (11, 16, 20):                          # every 5 minutes the burst allowance is back
            clock.advance(300)
            h.app.bridge.wake["w2s"].set()
            assert eventually(lambda: len(created_groups(h)) == expected and
                          len(queue_rows(h, "w2s", "pending")) == 20 - expected)
            assert len(created_groups(h)) == expected
        assert queue_rows(h, "w2s", "pending") == []
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["done"] * 20
        texts = sorted(o["text"] for o in h.received())
        assert texts == sorted("burst message %d" % i for i in range(20))
        assert len(created_groups(h)) == 20
        assert len({o["group"] for o in h.received()}) == 20

    def test_restart_between_creating_and_recording_adopts_the_group(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        tag = "0123abcd4567"
        h.app.store.save_group("default", ALICE, time.time(), "creating", tag, name="Alice Example")
        gid = h.signal.add_group("Alice Example", [OWNER],
                                 description="WhatSignal: WhatsApp chat bridged here (%s). Write here to answer it." % tag)
        h.signal.add_group("Someone else", [OWNER], description="WhatSignal: WhatsApp chat bridged here (ffff).")
        h.stop_app()
        h.start(connected=True)
        a_id, a = forward_to_signal(h, ALICE, "after the crash")
        assert a["group"] == gid
        assert created_groups(h) == []
        g = h.app.store.group_of_chat("default", ALICE)
        assert (g["state"], g["group"]) == ("active", gid)
        forward_to_signal(h, ALICE, "and again")
        assert created_groups(h) == [] and len(h.signal.groups) == 2

    def test_switching_an_inbox_installation_to_groups_keeps_old_quotes(self, make_bridge):
        h = make_bridge("daemon")
        a_id, a = forward_to_signal(h, ALICE, "from the inbox days")
        assert a["to"] == OWNER and a["text"] == "Alice Example: from the inbox days"
        h.stop_app()
        h.raw["bridge"] = {"layout": "groups"}
        h.start(connected=True)
        owner_push(h, "late answer", quote={"id": a["ts"], "author": BRIDGE, "text": a["text"]})
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": ALICE, "text": "late answer",
                                      "reply_to": a_id}]
        # a reaction on the old 1:1 copy still reaches the original too
        owner_push(h, None, reaction={"emoji": "\U0001F44D", "targetAuthor": BRIDGE, "targetSentTimestamp": a["ts"],
                                    "isRemove": False})
        assert eventually(lambda: h.waha.calls_for("/api/reaction"))
        assert h.waha.calls_for("/api/reaction")[0]["json"]["messageId"] == a_id

    def test_plain_text_in_the_control_room_gets_a_hint(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        forward_to_signal(h, ALICE, "hello")
        n = len(h.received())
        ts = owner_push(h, "an answer without a quote")
        assert eventually(lambda: len(h.received()) > n)
        note = h.received()[n]
        assert note["to"] == OWNER and note["quote_ts"] == ts and note["quote_author"] == OWNER
        assert "control room" in note["text"]
        marker = settle_s2w(h)                    # the owner's next message went out: the one before it did not
        assert [b["text"] for b in h.waha.sent()] == [marker]

    def test_to_command_creates_the_group_and_says_where(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        owner_push(h, "/to +447700900123 Hi, new chat here")
        assert eventually(lambda: waha_texts(h))
        assert waha_texts(h) == [{"session": "default", "chatId": "447700900123@c.us",
                                      "text": "Hi, new chat here"}]
        assert eventually(lambda: [t for t in h.texts(OWNER) if t.startswith("Sent.")])
        created = created_groups(h)
        assert len(created) == 1
        assert [t for t in h.texts(OWNER) if t.startswith("Sent.")] == \
            ["Sent. The chat continues in the Signal group %r." % created[0]["name"]]
        # its answer arrives in that group, which is reused
        forward_to_signal(h, "447700900123@c.us", "thanks!")
        assert len(created_groups(h)) == 1

    def test_a_refused_rename_never_costs_the_message(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time, layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "day one")
        h.waha.contacts[ALICE] = "Alice Renamed"
        clock.advance(86400 + 60)
        h.signal.errors.append((-1, "Failed to update group: not an admin", "updateGroup"))
        ev = wa_message(ALICE, new_mid(), "day two")
        sid = ev["payload"]["id"]
        assert h.webhook(ev)[0] == 200
        delivered = lambda: [o for o in h.received() if o["text"] == "day two"]
        dead = lambda: [r for r in queue_rows(h, "w2s") if r["state"] == "dead"]
        for _ in range(4):                      # whatever the retry policy, it arrives, in Alice's group
            if eventually(lambda: delivered() or dead(), 1.5):
                break
            clock.advance(600)
            h.app.bridge.wake["w2s"].set()
        assert not dead(), "the WhatsApp message was given up: %s" % dead()[0]["error"]
        assert delivered() and delivered()[0]["group"] == a["group"]
        assert eventually(lambda: [r["state"] for r in queue_rows(h, "w2s")] == ["done", "done"])

    def test_rename_on_the_rest_api(self, make_bridge):
        clock = FakeClock(start=time.time())
        h = make_bridge("rest", clock=clock.time, layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "day one")
        h.waha.contacts[ALICE] = "Alice Renamed"
        clock.advance(86400 + 60)
        forward_to_signal(h, ALICE, "day two")
        puts = h.signal.calls_for("/v1/groups/", "PUT")
        assert [(c["json"], c["status"]) for c in puts] == [({"name": "Alice Renamed"}, 204)]
        assert h.signal.groups[a["group"]]["name"] == "Alice Renamed"

    def test_typing_in_a_group_never_shows_in_another_chat(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        a_id, a = forward_to_signal(h, ALICE, "Alice first")
        forward_to_signal(h, BOB, "Bob last")
        typing = signal_fixture("signal-envelope-typing-derived.json")
        typing["envelope"]["typingMessage"]["groupId"] = a["group"]
        assert h.signal.push(typing)
        assert h.signal.push(group_envelope(new_ts(), "to Alice", a["group"]))
        assert eventually(lambda: waha_texts(h))
        assert [c["json"]["chatId"] for c in h.waha.calls if "Typing" in c["path"]] in ([], [ALICE])

    def test_reopen_a_whatsapp_group_by_its_signal_group_name(self, make_bridge):
        h = make_bridge("daemon", layout="groups")
        f_id, f = forward_to_signal(h, FAMILY, "hi all", participant=DORA)
        g = h.app.store.group_of_chat("default", FAMILY)
        assert g["name"] == "Family (WhatsApp)"
        h.app.store.save_group("default", FAMILY, time.time(), "left", g["tag"], g["group"], g["name"])
        n = len(h.received())
        owner_push(h, "/reopen Family (WhatsApp)")          # the name the owner sees in Signal
        assert eventually(lambda: len(h.received()) > n)
        assert h.texts(OWNER)[-1].startswith("Reopened 'Family (WhatsApp)'"), h.texts(OWNER)
        assert len(created_groups(h)) == 2


# ---------------------------------------------------------------------------
class TestWahaCore:
    """WAHA Core before 2026.6.1 refuses media sends (422, and 501 for video): the words still arrive."""

    @staticmethod
    def photo(h, name, mime="image/jpeg", data=SMALL_JPEG):
        h.signal.attachments[name] = data
        return [{"contentType": mime, "filename": None, "id": name, "size": len(data)}]

    def test_photo_goes_as_its_caption_owner_told_once_remembered_across_restarts(self, make_bridge):
        h = make_bridge("daemon")
        h.waha.old_core = True
        forward_to_signal(h, ALICE, "show me the view")
        owner_push(h, "Nice view", attachments=self.photo(h, "p1.jpg"))
        owner_push(h, None, attachments=self.photo(h, "p2.jpg"))
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)] == ["Nice view", "[photo]"]
        assert [c["status"] for c in h.waha.calls_for("/api/sendImage")] == [422]     # no failed call first, later
        told = [t for t in h.texts(OWNER) if "WAHA Plus" in t]
        assert told == ["WhatsApp got your photo as text only: sending media needs WAHA Plus (or WAHA 2026.6.1 or "
                        "newer, whose Core includes it). Media go as their caption (or [photo]) until WhatSignal "
                        "tries again in a day; /status shows it."]
        assert queue_rows(h, "s2w", state="dead") == []
        owner_push(h, "/status")
        assert eventually(lambda: any("Media to WhatsApp" in t for t in h.texts(OWNER)))
        assert "Media to WhatsApp: sent as text, WAHA cannot send file, image, video, voice (needs WAHA Plus or " \
               "another engine)" in h.texts(OWNER)[-1].splitlines()
        h.stop_app()
        h.start(connected=True)
        owner_push(h, "And the beach", attachments=self.photo(h, "p3.jpg"))
        settle_s2w(h)
        assert [b["text"] for b in waha_texts(h, ALICE)][-1] == "And the beach"
        assert len(h.waha.calls_for("/api/sendImage")) == 1
        assert len([t for t in h.texts(OWNER) if "as text only" in t]) == 1

    def test_video_the_engine_cannot_send_is_tried_again_after_a_day(self, make_bridge, tmp_path):
        clock = FakeClock(start=time.time())
        h = make_bridge("daemon", clock=clock.time)
        h.waha.old_core = True
        forward_to_signal(h, ALICE, "how was the party")
        owner_push(h, "Party!", attachments=self.photo(h, "v1.mp4", "video/mp4", SMALL_JPEG))
        settle_s2w(h)
        assert [c["status"] for c in h.waha.calls_for("/api/sendVideo")] == [501]
        assert waha_texts(h, ALICE)[-1]["text"] == "Party!"
        assert [t for t in h.texts(OWNER) if "cannot send videos" in t] != []
        h.waha.old_core = False                 # WAHA was upgraded; a day later media is tried again
        clock.advance(24 * 3600 + 1)
        owner_push(h, "Party 2", attachments=self.photo(h, "v2.mp4", "video/mp4", SMALL_JPEG))
        settle_s2w(h)
        assert [c["status"] for c in h.waha.calls_for("/api/sendVideo")] == [501, 201]
        assert h.waha.sent("video")[0]["caption"] == "Party 2"


# ---------------------------------------------------------------------------
class TestImpersonation:
    """Someone outside the owner's contacts picks their own WhatsApp name (push name): it is shown marked,
    as WhatsApp does, and a name given to /to never picks them over a saved contact."""

    STRANGER = "447700900999@c.us"

    def test_a_stranger_using_a_contacts_name_is_marked_and_never_gets_its_messages(self, make_bridge):
        h = make_bridge("daemon")                              # ALICE is saved as "Alice Example"
        forward_to_signal(h, ALICE, "dinner at 8?", push="Alice")
        sid, _copy = forward_to_signal(h, self.STRANGER, "new number, dinner at 9?", push="Alice Example")
        assert h.texts(OWNER)[-2:] == ["Alice Example: dinner at 8?",
                                         "~Alice Example (+447700900999): new number, dinner at 9?"]
        edit = h.waha.event("message.edited", {
            "id": "false_%s_3EB0ED17" % self.STRANGER, "timestamp": int(time.time()), "from": self.STRANGER,
            "fromMe": False, "body": "new number, dinner at 10?", "participant": None,
            "editedMessageId": sid.split("_")[2], "_data": {"Info": {"PushName": "Alice Example"}}})
        assert h.webhook(edit)[0] == 200
        assert eventually(lambda: h.received()[-1]["edit"])          # the edited copy keeps the mark
        assert h.received()[-1]["text"] == "~Alice Example (+447700900999): new number, dinner at 10?"
        forward_to_signal(h, "447700900888@c.us", "it's Alice", push="Alice")
        assert h.texts(OWNER)[-1] == "~Alice (+447700900888): it's Alice"
        # before: "/to Alice" picked the stranger whose push name is exactly "Alice"
        owner_push(h, "/to Alice see you at 8")
        owner_push(h, "/to Alice Example see you at 8!")
        settle_s2w(h)
        assert [(b["chatId"], b["text"]) for b in waha_texts(h) if b["text"].startswith("see you")] == \
            [(ALICE, "see you at 8"), (ALICE, "see you at 8!")]
        # a stranger is reached by the whole marked name (or number), never by a name alone
        owner_push(h, "/to ~Alice (+447700900888) who are you?")
        settle_s2w(h)
        assert waha_texts(h, "447700900888@c.us")[-1]["text"] == "who are you?"
        owner_push(h, "/chats")
        assert eventually(lambda: h.texts(OWNER)[-1].startswith("Recent chats"))
        assert "~Alice Example (+447700900999)" in h.texts(OWNER)[-1]
        assert "(+447700900999) (+447700900999)" not in h.texts(OWNER)[-1]

    def test_a_push_name_an_older_release_recorded_unmarked_is_not_trusted(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, ALICE, "dinner at 8?")
        h.app.store.touch_chat("default", self.STRANGER, time.time(), name="Alice")   # as the older release did
        owner_push(h, "/to Alice see you at 8")
        settle_s2w(h)
        assert [b["chatId"] for b in waha_texts(h) if b["text"] == "see you at 8"] == [ALICE]

    def test_a_name_only_strangers_carry_or_several_chats_share_answers_with_the_candidates(self, make_bridge):
        h = make_bridge("daemon")
        h.waha.contacts["447700900555@c.us"] = "Bob Marley"
        forward_to_signal(h, BOB, "hi from Bob Builder")
        forward_to_signal(h, "447700900555@c.us", "hi from Bob Marley")
        forward_to_signal(h, self.STRANGER, "hi, Zed here", push="Zed")
        sent = len(h.waha.sent("text"))
        owner_push(h, "/to Bob are you there?")
        assert eventually(lambda: "matches several chats" in h.texts(OWNER)[-1])
        assert "Bob Builder" in h.texts(OWNER)[-1] and "Bob Marley" in h.texts(OWNER)[-1]
        owner_push(h, "/to Zed are you there?")
        assert eventually(lambda: h.texts(OWNER)[-1].startswith("No saved contact or group is named 'Zed'"))
        assert "~Zed (+447700900999)" in h.texts(OWNER)[-1]
        settle_s2w(h)
        assert [b["text"] for b in h.waha.sent("text")[sent:]][:-1] == []      # only the settle marker went out


###############################################################################
# signal-cli as its own source defines it #####################################
###############################################################################

# ---------------------------------------------------------------------------
# The bridge against signal-cli's real behaviour (upstream-behaviours.md):
# the JDK HTTP server's writes, Jackson's string limit, data-URI decoding, the
# Host check, identity and rate-limit results, multi-account daemons.
# Helpers are prefixed sc_.
# ---------------------------------------------------------------------------

LIMIT_CHAT = "15550002222@c.us"


class TestSignalCliWire:
    """signal-cli's daemon is the JDK's HTTP server: Nagle on, headers and body in two writes."""

    def test_the_fake_writes_like_the_jdk_server(self, bridge):
        h = bridge
        assert h.signal.nodelay is False and h.waha.nodelay is True
        client = ws.SignalRpcClient(h.signal.url, BRIDGE)
        client.send(OWNER, "one")
        with h.signal._lock:
            socks = [sock for sock, _ in h.signal._conns.values()]
        assert socks and not any(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)

    def test_many_calls_on_one_kept_alive_connection_do_not_wait_for_delayed_acks(self, bridge):
        h = bridge
        client = ws.SignalRpcClient(h.signal.url, BRIDGE)      # the product's own client and transport
        assert eventually(lambda: h.signal.stream_connections == 1)
        opened = h.signal.connections_opened
        for i in range(200):
            client.send(OWNER, "call %d" % i)
        assert len([p for p in h.signal.sent() if p["message"].startswith("call ")]) == 200
        assert h.signal.connections_opened - opened == 1, "one kept-alive connection for every call"

    def test_without_quickack_each_call_takes_a_new_connection(self, bridge):
        h = bridge
        client = ws.SignalRpcClient(h.signal.url, BRIDGE, ws.HttpTransport(quickack=False))
        assert eventually(lambda: h.signal.stream_connections == 1)
        opened = h.signal.connections_opened
        for i in range(100):
            client.send(OWNER, "fresh %d" % i)
        assert h.signal.connections_opened - opened >= 100
        assert all(c["headers"].get("connection") == "close" for c in h.signal.calls_for("/api/v1/rpc")[-100:])

    def test_the_bridge_delivers_a_backlog_through_the_jdk_like_server(self, bridge):
        h = bridge
        for i in range(150):
            post_event(h, wa_message(LIMIT_CHAT, "JDK%04d" % i, "burst %d" % i))
        assert eventually(lambda: len([t for t in h.texts() if "burst " in (t or "")]) == 150, 30.0)
        texts = [t for t in h.texts() if "burst " in (t or "")]
        assert [int(t.rsplit(" ", 1)[1]) for t in texts] == list(range(150))
        assert h.signal.connections_opened <= 6     # kept alive: the receiver's stream, the worker, health


class TestSignalCliDataUriNames:
    """signal-cli URL-decodes data-URI parameters and cuts them at ';', '=' and ',' (DataURI.java)."""

    @pytest.mark.parametrize("name", ["Rabatt 20%+x=y;z.pdf", "a,b;base64,c.pdf", "100% sicher.pdf",
                                      "Müller & Söhne (Entwurf) #2.pdf", "%41%zz+.pdf"])
    def test_every_file_name_arrives_exactly_as_sent(self, bridge, name):
        h = bridge
        url = h.waha.add_file("3EB0NAME.pdf", PDF_BYTES, "application/pdf")
        post_event(h, wa_message(LIMIT_CHAT, "3EB0NAME", "the offer", hasMedia=True, media={
            "url": url, "mimetype": "application/pdf", "filename": name, "error": None}))
        assert eventually(lambda: h.signal.requests("send"))
        rec = h.signal.requests("send")[0]
        assert rec["error"] is None, rec["error"]
        assert [(a["filename"], a["data"]) for a in rec["attachments"]] == [(name, PDF_BYTES)]
        assert rec["message"].endswith("the offer")

    def test_the_fake_decodes_like_signal_cli(self, bridge):
        """Names written unencoded break on signal-cli: a bad escape makes the URI a file path, '=' moves the
        key, '+' becomes a space."""
        client = ws.SignalRpcClient(bridge.signal.url, BRIDGE)
        data = base64.b64encode(PDF_BYTES).decode()
        with pytest.raises(ws.UpstreamError):
            client.call("send", {"recipient": [OWNER], "attachments": [
                "data:application/pdf;filename=100% sicher.pdf;base64," + data]})
        names = []
        for raw in ("Rabatt 20%+x=y;z.pdf", "a+b.pdf"):
            client.call("send", {"recipient": [OWNER], "attachments": [
                "data:application/pdf;filename=%s;base64,%s" % (raw, data)]})
            names.append(bridge.signal.requests("send")[-1]["attachments"][0]["filename"])
        assert names == [None, "a b.pdf"]

OVER_JSON_LIMIT_PDF = PDF_BYTES + b"0" * (16 * 1024 * 1024)     # 16 MB: ~22,400,000 base64 characters, over Jackson's limit


@pytest.fixture
def daemon_bridge(make_bridge):
    """make_bridge on the signal-cli daemon, with a metrics token; `raw_overrides` as keyword arguments."""
    def make(clock=None, **raw_overrides):
        raw_overrides.setdefault("server", {"metricsToken": METRICS_TOKEN})
        return make_bridge("daemon", clock=clock, raw_overrides=raw_overrides)
    return make


def pdf_message(h, wa, url, body, filename="Vertrag 2026.pdf", chat=LIMIT_CHAT):
    return wa_image(chat, wa, url, "application/pdf", body, filename)


class TestSignalCliJsonLimit:
    """Jackson's 20,000,000-character string limit, -32603 by its message, media retries, dead letters."""

    def test_the_fake_refuses_a_string_over_the_limit_like_signal_cli(self, daemon_bridge, tmp_path):
        h = daemon_bridge()
        path = tmp_path / "big.pdf"
        path.write_bytes(OVER_JSON_LIMIT_PDF)
        client = ws.SignalRpcClient(h.signal.url, BRIDGE)
        with pytest.raises(ws.MediaRefused):
            client.send(OWNER, "x", [ws.SignalAttachment("application/pdf", "big.pdf", str(path))])
        last = h.signal.calls_for("/api/v1/rpc")[-1]
        assert last["status"] == 200 and last["response"] == {"jsonrpc": "2.0", "error": {
            "code": -32603, "message": "An internal server error has occurred."}, "id": None}

    def test_media_over_the_limit_goes_as_a_notice_at_once_and_the_chat_moves_on(self, daemon_bridge):
        h = daemon_bridge(media={"maxSizeMB": 30})
        url = h.waha.add_file("3EB0BIG.pdf", OVER_JSON_LIMIT_PDF, "application/pdf")
        post_event(h, pdf_message(h, "3EB0BIG", url, "the contract"))
        post_event(h, wa_message(LIMIT_CHAT, "3EB0AFTER", "and one more"))
        assert eventually(lambda: len(h.texts()) == 2, 20), h.texts()
        first, second = h.texts()
        assert "[document, 16 MB, too large for signal-cli's JSON-RPC" in first and first.endswith("the contract")
        assert second.endswith("and one more")
        assert all(not r["attachments"] for r in h.signal.requests("send"))
        warns = [r for r in h.logs.records() if "signal.attachmentDir" in r.get("msg", "")]
        assert len(warns) == 1 and warns[0]["level"] == "WARN"
        assert eventually(lambda: h.app.store.queue_depth("w2s") == 0)

    def test_with_attachment_dir_the_file_goes_by_path_and_is_removed(self, daemon_bridge, tmp_path):
        shared = tmp_path / "shared"
        shared.mkdir()
        h = daemon_bridge(media={"maxSizeMB": 30}, signal={"attachmentDir": str(shared)})
        url = h.waha.add_file("3EB0BIG.pdf", OVER_JSON_LIMIT_PDF, "application/pdf")
        post_event(h, pdf_message(h, "3EB0BIG", url, "the contract", filename="Vertrag 20%+x=y;z.pdf"))
        assert eventually(lambda: h.signal.sent(), 20)
        rec = h.signal.requests("send")[0]
        assert rec["error"] is None and rec["message"].endswith("the contract")
        [att] = rec["attachments"]
        assert att["data"] == OVER_JSON_LIMIT_PDF and att["filename"] == "Vertrag 20%+x=y;z.pdf"
        assert os.path.dirname(os.path.dirname(att["path"])) == str(shared)
        assert eventually(lambda: list(shared.iterdir()) == [])      # nothing private lingers
        small = h.waha.add_file("3EB0SMALL.pdf", PDF_BYTES, "application/pdf")
        post_event(h, pdf_message(h, "3EB0SMALL", small, "small one"))
        assert eventually(lambda: len(h.signal.sent()) == 2)
        assert h.signal.requests("send")[1]["attachments"][0].get("path") is None   # small media: a data URI

    def test_a_missing_attachment_dir_does_not_block_the_chat(self, daemon_bridge, tmp_path):
        h = daemon_bridge(media={"maxSizeMB": 30}, signal={"attachmentDir": str(tmp_path / "not-there")})
        url = h.waha.add_file("3EB0BIG.pdf", OVER_JSON_LIMIT_PDF, "application/pdf")
        post_event(h, pdf_message(h, "3EB0BIG", url, "the contract"))
        post_event(h, wa_message(LIMIT_CHAT, "3EB0AFTER", "and one more"))
        assert eventually(lambda: len(h.texts()) == 2, 20), h.texts()
        assert "could not be sent to Signal" in h.texts()[0] and h.texts()[1].endswith("and one more")
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert len(errors) == 1 and "signal.attachmentDir" in errors[0]["msg"] and "Fix:" in errors[0]["msg"]
        assert not (tmp_path / "not-there").exists()

    def test_an_unreadable_request_is_not_retried_and_the_text_still_arrives(self, daemon_bridge):
        h = daemon_bridge()
        url = h.waha.add_file("3EB0PDF.pdf", PDF_BYTES, "application/pdf")
        h.signal.errors.append((-32603, "An internal server error has occurred.", "send"))
        post_event(h, pdf_message(h, "3EB0PDF", url, "see attached"))
        post_event(h, wa_message(LIMIT_CHAT, "3EB0NEXT", "next"))
        assert eventually(lambda: len(h.texts()) == 2, 10), h.texts()
        first, second = h.texts()
        assert "[document, %d bytes, could not be sent to Signal]" % len(PDF_BYTES) in first
        assert first.endswith("see attached")
        assert second.endswith("next")
        assert [r["error"] is not None for r in h.signal.requests("send")] == [True, False, False]

    def test_media_failing_at_signal_cli_is_capped_then_sent_as_text(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        url = h.waha.add_file("3EB0PDF.pdf", PDF_BYTES, "application/pdf")
        for _ in range(ws.Bridge.media_tries):
            h.signal.errors.append((-32603, "Failed to send message: Connection reset (IOException)", "send"))
        post_event(h, pdf_message(h, "3EB0PDF", url, "retry me"))
        post_event(h, wa_message(LIMIT_CHAT, "3EB0NEXT", "behind it"))
        assert drain(h, d, clock)
        reqs = h.signal.requests("send")
        assert [bool(r["params"].get("attachments")) for r in reqs] == [True] * ws.Bridge.media_tries + [False, False]
        assert "could not be sent to Signal" in reqs[-2]["message"] and reqs[-2]["message"].endswith("retry me")
        assert reqs[-1]["message"].endswith("behind it")

    def test_an_outage_does_not_count_against_the_media(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        url = h.waha.add_file("3EB0PDF.pdf", PDF_BYTES, "application/pdf")
        h.signal.mode = "down"
        post_event(h, pdf_message(h, "3EB0PDF", url, "after the outage"))
        for _ in range(ws.Bridge.media_tries + 2):
            d.run_once()
            clock.advance(301.0)
        h.signal.mode = "ok"
        assert drain(h, d, clock)
        [rec] = h.signal.requests("send")
        assert rec["attachments"][0]["data"] == PDF_BYTES

    def test_the_owner_hears_of_a_dead_letter_from_whatsapp(self, daemon_bridge):
        h = daemon_bridge()
        h.signal.errors.append((-1, "Invalid group id: x", "send"))
        post_event(h, wa_message(LIMIT_CHAT, "3EB0DEAD", "lost words", push="Carol"))
        assert eventually(lambda: h.texts(), 10)
        [notice] = h.texts()
        assert notice.startswith("A WhatsApp message from ") and "could not be delivered here" in notice
        assert "outbox" in notice and "lost words" not in notice
        assert h.app.store.one("SELECT COUNT(*) FROM queue WHERE state='dead'")[0] == 1

METRICS_TOKEN = "metrics-token-" + "m" * 24


def health_of(h, details=True):
    """/health as the operator sees it (with server.metricsToken: the checks' messages) or as anyone does."""
    h.app.health_cache.clear()
    return http_request(h.url, "GET", "/health", headers={"Authorization": "Bearer " + METRICS_TOKEN} if details else {})[3]


class TestSignalCliSetupErrors:
    """signal-cli refusing the bridge itself is a configuration error: keep the messages, say so once."""

    def test_the_host_check_421_keeps_messages_logs_one_error_and_degrades_health(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        assert eventually(lambda: h.signal.stream_connections == 1)
        h.signal.bound_port = h.signal.port + 1      # signal-cli bound to another port, reached through a mapping
        for i in range(3):
            post_event(h, wa_message(LIMIT_CHAT, "3EB0HOST%d" % i, "held %d" % i))
        for _ in range(4):
            d.run_once()
            clock.advance(3600.0 * 30)              # longer than expireAfterHours: still nothing is given up
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending"] * 3
        assert all(c["status"] == 421 for c in h.signal.calls_for("/api/v1/rpc"))
        assert h.signal.sent() == []
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert len(errors) == 1 and "421" in errors[0]["msg"] and "--http 0.0.0.0" in errors[0]["msg"]
        rep = health_of(h)
        assert rep["status"] == "degraded" and "421" in rep["checks"]["signal"]["error"]
        assert health_of(h, details=False)["checks"]["signal"]["error"] == "misconfigured"   # no address for anyone
        probes = h.signal.calls_for("/api/v1/rpc")[-1]
        assert probes["json"]["method"] == "version"                 # the probe hits the RPC endpoint
        h.signal.bound_port = None                                   # fixed
        clock.advance(60.0)
        assert drain(h, d, clock)
        assert [t.rsplit(" ", 1)[1] for t in h.texts()] == ["0", "1", "2"]
        assert health_of(h)["status"] == "healthy"
        assert any("accepts the bridge's requests again" in r["msg"] for r in h.logs.records())

    def test_the_event_stream_is_host_checked_too(self, daemon_bridge):
        h = daemon_bridge()
        assert eventually(lambda: h.signal.stream_connections == 1)
        h.signal.bound_port = h.signal.port + 1
        h.signal.close_streams()
        assert eventually(lambda: any(c["status"] == 421 for c in h.signal.calls_for("/api/v1/events")))
        assert eventually(lambda: health_of(h)["status"] == "degraded")
        assert h.signal.calls_for("/api/v1/check")[-1]["status"] == 200      # /api/v1/check alone would say fine
        h.signal.bound_port = None
        assert eventually(lambda: h.signal.stream_connections == 1, 15)
        owner_push(h, "/status")
        assert eventually(lambda: h.texts())
        assert h.texts()[0].startswith("WhatSignal ")

    def test_a_daemon_serving_several_accounts(self, daemon_bridge):
        h = daemon_bridge()
        h.signal.accounts = ["+15550000009", BRIDGE]
        h.signal.close_streams()
        assert eventually(lambda: h.signal.stream_connections == 1)
        stream = h.signal.calls_for("/api/v1/events")[-1]
        assert stream["query"] == {"account": BRIDGE}
        other = envelope(text="for the other account")
        other["account"] = "+15550000009"
        h.signal.push(other)                              # the stream mixes accounts unless asked not to
        post_event(h, wa_message(LIMIT_CHAT, "3EB0MULTI", "to the owner"))
        assert eventually(lambda: h.texts())
        assert all(r["error"] is None for r in h.signal.requests())
        assert all(c["json"]["params"].get("account") is None for c in h.signal.calls_for("/api/v1/rpc"))  # taken out
        sent = [c for c in h.signal.calls_for("/api/v1/rpc") if c["json"]["method"] == "send"]
        assert sent and all(b'"account":"%s"' % BRIDGE.encode() in c["body"] for c in sent)
        assert h.app.store.queue_depth("s2w") == 0 and h.waha.sent() == []

    def test_an_envelope_of_another_account_is_ignored(self, daemon_bridge):
        h = daemon_bridge()
        post_event(h, wa_message(LIMIT_CHAT, "3EB0FIRST", "so the owner has a chat"))
        assert eventually(lambda: h.texts())
        other = envelope(text="not ours")
        other["account"] = "+15550000009"
        h.signal.push(other)
        ours = envelope(text="ours")
        h.signal.push(ours)
        assert eventually(lambda: h.waha.sent())
        assert [b.get("text") for b in h.waha.sent()] == ["ours"]

    def test_without_the_account_parameter_a_multi_account_daemon_refuses(self, daemon_bridge):
        h = daemon_bridge()
        h.signal.accounts = ["+15550000009", BRIDGE]
        c = ws.HttpTransport().request("POST", h.signal.url + "/api/v1/rpc", {"Content-Type": "application/json"},
                                       json.dumps({"jsonrpc": "2.0", "method": "send", "id": 1, "params": {
                                           "recipient": [OWNER], "message": "x"}}).encode())
        assert json.loads(c.body)["error"] == {"code": -32602, "message": "Method requires valid account parameter",
                                               "data": None}

    def test_a_daemon_without_our_account_is_a_setup_error(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        h.signal.accounts = ["+15550000009"]
        post_event(h, wa_message(LIMIT_CHAT, "3EB0NOACC", "kept"))
        d.run_once()
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending"]
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert len(errors) == 1 and "signal.number" in errors[0]["msg"] and "Specified account" in errors[0]["msg"]
        assert "signal.number" in health_of(h)["checks"]["signal"]["error"]

    def test_rest_json_rpc_number_not_registered_is_our_own_account(self, tmp_path):
        h = Harness(tmp_path, "rest-json-rpc", raw_overrides={"server": {"metricsToken": METRICS_TOKEN}}).start()
        try:
            h.signal.number = "+15550000009"          # the API's signal-cli knows another account, not ours
            post_event(h, wa_message(LIMIT_CHAT, "3EB0REST", "kept too"))
            assert eventually(lambda: any(c["status"] == 400 for c in h.signal.calls_for("/v2/send")))
            assert eventually(lambda: [r for r in h.logs.records() if r["level"] == "ERROR"])
            errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
            assert len(errors) == 1 and "own number signal.number" in errors[0]["msg"]
            assert "recipient" not in errors[0]["msg"]
            assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending"]
            assert "own number" in health_of(h)["checks"]["signal"]["error"]
        finally:
            h.stop()


class TestSignalCliUntrustedOwner:
    """The owner's new safety number on receive: signal-cli emits only an UntrustedIdentityException."""

    def test_the_bridge_says_so_once_and_the_held_message_arrives_after_trust(self, daemon_bridge):
        h = daemon_bridge()
        post_event(h, wa_message(LIMIT_CHAT, "3EB0KEY", "hi"))
        assert eventually(lambda: h.texts())
        h.signal.untrusted_senders.add(OWNER)
        owner_push(h, "sent from my new phone")
        owner_push(h, "and again")
        assert eventually(lambda: len([r for r in h.logs.records() if "UntrustedIdentityException" in json.dumps(r)
                                       or "untrusted identity" in r["msg"]]) >= 1)
        assert eventually(lambda: len(h.signal.delivered) == 2)
        assert all(o.get("exception", {}).get("type") == "UntrustedIdentityException" for o in h.signal.delivered)
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert len(errors) == 1 and "trust -a OWNER" in errors[0]["msg"] and "signal.trustNewIdentity" in errors[0]["msg"]
        metrics = http_request(h.url, "GET", "/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN})[2].decode()
        assert "whatsignal_untrusted_identity_total 2.0" in metrics.splitlines()
        assert h.waha.sent() == [] and h.signal.trusted == []
        # the operator trusts the key with signal-cli itself
        ws.SignalRpcClient(h.signal.url, BRIDGE).trust(OWNER)
        assert eventually(lambda: len(h.waha.sent()) == 2)
        assert [b["text"] for b in h.waha.sent()] == ["sent from my new phone", "and again"]
        told = [t for t in h.texts() if "safety number" in t]
        assert len(told) == 1 and "now trusted" in told[0]

    def test_trust_new_identity_trusts_and_tells_the_owner(self, daemon_bridge):
        h = daemon_bridge(signal={"trustNewIdentity": True})
        post_event(h, wa_message(LIMIT_CHAT, "3EB0KEY2", "hi"))
        assert eventually(lambda: h.texts())
        h.signal.untrusted_senders.add(OWNER)
        owner_push(h, "new phone, same me")
        assert eventually(lambda: [b["text"] for b in h.waha.sent()] == ["new phone, same me"])
        assert h.signal.trusted == [OWNER]
        told = [t for t in h.texts() if "safety number" in t]
        assert len(told) == 1
        assert any("trusted the owner's new safety number" in r["msg"] for r in h.logs.records())


class TestSignalCliRateLimits:
    """Send results carry retryAfterSeconds and, when Signal wants a captcha, a challenge token."""

    def test_retry_after_seconds_is_honoured(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        h.signal.recipient_results[OWNER] = "RATE_LIMIT_FAILURE"
        h.signal.retry_after_seconds = 900
        post_event(h, wa_message(LIMIT_CHAT, "3EB0RATE", "patience"))
        d.run_once()
        h.signal.recipient_results.pop(OWNER)
        clock.advance(600)
        d.run_once()
        assert len(h.signal.requests("send")) == 1          # 600 s < 900 s: not yet
        clock.advance(301)
        d.run_once()
        assert h.texts()[-1].endswith("patience")

    def test_a_captcha_is_reported_once_with_the_exact_step_and_messages_wait(self, daemon_bridge):
        h = daemon_bridge()
        d, clock = manual_deliverer(h)
        h.signal.recipient_results[OWNER] = "RATE_LIMIT_FAILURE"
        h.signal.captcha_token = "5fd0b3c2-challenge"
        for i in range(2):
            post_event(h, wa_message(LIMIT_CHAT, "3EB0CAP%d" % i, "wait %d" % i))
        for _ in range(5):
            d.run_once()
            clock.advance(3600.0 * 12)                      # two and a half days: nothing given up
        assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending", "pending"]
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert len(errors) == 1
        assert ("signal-cli -a %s submitRateLimitChallenge --challenge 5fd0b3c2-challenge --captcha" % BRIDGE
                in errors[0]["msg"]) and "signalcaptchas.org" in errors[0]["msg"]
        notices = [r for r in h.signal.requests("send") if "captcha" in (r["params"].get("message") or "")]
        assert len(notices) == 1 and notices[0]["params"]["recipient"] == [OWNER]   # told once (best effort)
        h.signal.recipient_results.pop(OWNER)            # the operator solved it
        assert drain(h, d, clock)
        assert [t.rsplit(" ", 1)[1] for t in h.texts() if "wait " in t] == ["0", "1"]

    def test_rest_challenge_tokens_are_a_captcha_too(self, tmp_path):
        h = Harness(tmp_path, "rest-json-rpc").start()
        try:
            d, clock = manual_deliverer(h)
            h.signal.recipient_failures[OWNER] = "RATE_LIMIT_FAILURE"
            post_event(h, wa_message(LIMIT_CHAT, "3EB0RCAP", "rest wait"))
            for _ in range(3):
                d.run_once()
                clock.advance(3600.0 * 20)
            assert [r["state"] for r in queue_rows(h, "w2s")] == ["pending"]
            errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
            assert len(errors) == 1 and "rate-limit-challenge" in errors[0]["msg"]
            h.signal.recipient_failures.pop(OWNER)
            assert drain(h, d, clock)
            assert h.texts()[-1].endswith("rest wait")
        finally:
            h.stop()


class TestSignalCliOwnerAttachments:

    def test_an_attachment_over_the_limit_is_refused_before_get_attachment(self, daemon_bridge):
        h = daemon_bridge()
        post_event(h, wa_message(LIMIT_CHAT, "3EB0ATT", "send me the film"))
        assert eventually(lambda: h.texts())
        h.signal.attachments["film.mp4"] = b"\x00\x00\x00\x18ftypmp42" + b"0" * 64
        ts = owner_push(h, "here", attachments=[{"contentType": "video/mp4", "id": "film.mp4", "filename": "film.mp4",
                                               "size": 60 * 1024 * 1024, "width": None, "height": None,
                                               "caption": None, "uploadTimestamp": None}])
        assert eventually(lambda: [t for t in h.texts() if t.startswith("Not delivered to WhatsApp")])
        [told] = [t for t in h.texts() if t.startswith("Not delivered to WhatsApp")]
        assert "60 MB over media.maxSizeMB (5 MB)" in told
        assert h.signal.requests("getAttachment") == [] and h.waha.sent() == []
        assert [r["params"].get("quoteTimestamp") for r in h.signal.requests("send")][-1] == ts

###############################################################################
# Operations, faults and abuse ################################################
###############################################################################

# ---------------------------------------------------------------------------
# Issue 5 (operations) and issue 7 (proof under faults and abuse).
# ---------------------------------------------------------------------------



NEW_SECRET = "rotated-secret-" + "n" * 32
KLARA = "4915111111189@c.us"
LUKAS = "4915222222278@c.us"
MARTA = "4915333333367@c.us"
T0 = 1767225600.0          # 2026-01-01T00:00:00Z: the injected "now" of the retention tests
DAY = 86400.0


def shown_everywhere(push, chat=KLARA):
    """How the owner sees a sender known only by the push name *push* (not a saved contact)."""
    return "~%s (+%s)" % (push, chat.split("@")[0])


def body_of(event):
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WebhookPoster:
    """Signed webhooks over one kept-alive connection (reconnects when the server closes it)."""

    def __init__(self, url, timeout=10.0):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn = None
        self.connects = 0

    def post(self, body, secret=WEBHOOK_SECRET, headers=None):
        """Return (status, body bytes, seconds); raises OSError/HTTPException when unreachable."""
        if isinstance(body, dict):
            body = body_of(body)
        hdrs = {"Content-Type": "application/json", "X-Webhook-Hmac": sign(body, secret),
                "X-Webhook-Hmac-Algorithm": "sha512"}
        hdrs.update(headers or {})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.connects += 1
            t = time.monotonic()
            try:
                self.conn.request("POST", "/webhook/whatsapp", body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 0:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if resp.will_close:
                self.close()
            return resp.status, data, time.monotonic() - t
        raise OSError("unreachable")  # pragma: no cover

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def db_query(db_path, sql, args=()):
    """Run one statement on the raw database file and commit it (what someone with the file can do)."""
    db = sqlite3.connect(db_path, timeout=10)
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


def open_store(path, secret=ENC_SECRET):
    store = ws.Store(str(path))
    store.unlock(secret)
    return store


def last_queue_id(store):
    return store.one("SELECT MAX(id) FROM queue")[0]


def row_record(store, row_id):
    return store.record_of(store.one("SELECT * FROM queue WHERE id=?", (row_id,)))


# ===========================================================================
# Issue 5: retention cleaner
# ===========================================================================

class TestRetention:

    def fill_ages(self, store):
        """Old and young rows of every kind; return the ids of the queue rows by name."""
        old, young = T0 - 40 * DAY, T0 - 1 * DAY
        ids = {}
        for name, at, state in (("old_done", old, "done"), ("old_dead", old, "dead"), ("old_pending", old, None),
                                ("young_done", young, "done"), ("young_pending", young, None)):
            assert store.enqueue("default", "w2s", "dedupe-" + name, KLARA, "message",
                                 {"id": name, "body": "text of " + name}, at)
            ids[name] = last_queue_id(store)
            if state:
                store.finish(ids[name], state, at, error="x" if state == "dead" else None)
        with store.tx() as db:
            store.add_mapping(db, "default", "w2s", KLARA, "false_%s_OLDMSG" % KLARA, 111, BRIDGE, old)
            store.add_mapping(db, "default", "w2s", LUKAS, "false_%s_NEWMSG" % LUKAS, 222, BRIDGE, young)
        store.touch_chat("default", KLARA, old, name="Alice")
        store.touch_chat("default", LUKAS, young, name="Bob")
        store.set_contact("default", KLARA, "Alice", old)
        store.set_contact("default", LUKAS, "Bob", young)
        store.set_lid("default", "111@lid", KLARA, old)
        store.set_lid("default", "222@lid", LUKAS, young)
        return ids

    def test_cleanup_deletes_everything_old_and_nothing_young_or_pending(self, tmp_path):
        config = make_config(offline_raw(tmp_path, retentionDays=30, media={"retentionDays": 7}))
        store = open_store(tmp_path / "whatsignal.db")
        try:
            ids = self.fill_ages(store)
            cache = tmp_path / "cache"
            cache.mkdir()
            outside = tmp_path / "outside.jpg"
            outside.write_bytes(b"keep me")
            files = {"old_media": "m-" + "a" * 32 + ".jpg", "young_media": "m-" + "b" * 32 + ".ogg",
                     "old_other": "notes.txt", "old_short": "m-" + "c" * 31 + ".jpg",
                     "old_upper": "m-" + "D" * 32 + ".jpg"}
            for key, name in files.items():
                p = cache / name
                p.write_bytes(b"data")
                at = T0 - (1 if key == "young_media" else 8) * DAY
                os.utime(p, (at, at))
            link = cache / ("m-" + "e" * 32 + ".png")
            os.symlink(str(outside), str(link))
            os.utime(str(outside), (T0 - 90 * DAY,) * 2)

            counts = ws.cleanup(store, config, T0)

            assert counts == {"queue": 2, "messages": 1, "chats": 1, "contacts": 1, "lids": 1, "state": 0, "media_files": 1}
            left = {r[0]: r[1] for r in store.query("SELECT id, state FROM queue")}
            assert left == {ids["old_pending"]: "pending", ids["young_done"]: "done", ids["young_pending"]: "pending"}
            # the old pending item is intact and still readable
            assert row_record(store, ids["old_pending"])["body"] == "text of old_pending"
            assert store.by_wa("default", "OLDMSG") is None
            assert store.by_wa("default", "NEWMSG")["chat"] == LUKAS
            assert [c["chat"] for c in store.all_chats("default")] == [LUKAS]
            assert store.contact("default", KLARA) == (None, 0)
            assert store.contact("default", LUKAS)[0] == "Bob"
            assert store.lid("default", "111@lid") == (False, None)
            assert store.lid("default", "222@lid") == (True, LUKAS)
            remaining = sorted(os.listdir(str(cache)))
            assert files["old_media"] not in remaining
            assert sorted([n for k, n in files.items() if k != "old_media"] + [link.name]) == remaining
            assert outside.read_bytes() == b"keep me"
            # a second sweep finds nothing more
            assert ws.cleanup(store, config, T0) == {"queue": 0, "messages": 0, "chats": 0, "contacts": 0,
                                                         "lids": 0, "state": 0, "media_files": 0}
        finally:
            store.close()

    def test_media_retention_defaults_to_retention_days(self, tmp_path):
        config = make_config(offline_raw(tmp_path, retentionDays=10))
        store = open_store(tmp_path / "whatsignal.db")
        try:
            cache = tmp_path / "cache"
            cache.mkdir()
            for days, name in ((11, "m-" + "1" * 32 + ".jpg"), (9, "m-" + "2" * 32 + ".jpg")):
                (cache / name).write_bytes(b"x")
                os.utime(str(cache / name), (T0 - days * DAY,) * 2)
            assert ws.cleanup(store, config, T0)["media_files"] == 1
            assert os.listdir(str(cache)) == ["m-" + "2" * 32 + ".jpg"]
        finally:
            store.close()

    def test_batched_sweep_of_100k_rows_keeps_webhooks_fast(self, bridge):
        h = bridge
        db_path = h.raw["database"]["path"]
        old = time.time() - 40 * DAY
        db = sqlite3.connect(db_path, timeout=30)
        try:
            with db:
                db.executemany(
                    "INSERT INTO queue(channel, direction, dedupe, chat, kind, body, state, attempts, next_at,"
                    " created_at, updated_at) VALUES ('default', 'w2s', ?, 'c', 'message', x'00', ?, 1, ?, ?, ?)",
                    (("bulk%d" % i, "done" if i % 7 else "dead", old, old, old) for i in range(70000)))
                db.executemany(
                    "INSERT INTO messages(channel, direction, wa_chat, wa_chat_enc, wa_msg, sig_ts, created_at)"
                    " VALUES ('default', 'w2s', 'c', x'00', ?, ?, ?)",
                    (("m%d" % i, i, old) for i in range(30000)))
        finally:
            db.close()
        assert db_query(db_path, "SELECT COUNT(*) FROM queue")[0][0] + \
            db_query(db_path, "SELECT COUNT(*) FROM messages")[0][0] == 100000

        result, latencies, statuses = {}, [], []
        sweep = threading.Thread(target=lambda: result.update(counts=ws.run_cleanup(h.app)))
        poster = WebhookPoster(h.url)
        sweep.start()
        i = 0
        try:
            while sweep.is_alive() or i < 5:
                status, _, took = poster.post(wa_message(KLARA, "SWEEP%04d" % i, "during sweep %d" % i))
                statuses.append(status)
                latencies.append(took)
                i += 1
        finally:
            sweep.join(60)
            poster.close()
        counts = result["counts"]
        assert counts["queue"] == 70000 and counts["messages"] == 30000
        assert set(statuses) == {200}
        assert len(latencies) >= 5
        assert max(latencies) < 5.0, "webhook blocked for %.3f s during the sweep" % max(latencies)
        assert eventually(lambda: len(h.texts()) == i, 20)
        assert all(s.endswith(": during sweep %d" % n) for n, s in enumerate(h.texts()))
        # nothing of the young traffic was swept
        assert db_query(db_path, "SELECT COUNT(*) FROM queue")[0][0] == i

    def test_run_cleanup_logs_success_and_sets_metrics(self, bridge):
        h = bridge
        store = h.app.store
        old = time.time() - 40 * DAY
        for n in range(3):
            store.enqueue("default", "w2s", "old%d" % n, KLARA, "message", {"x": n}, old)
            store.finish(last_queue_id(store), "done", old)
        before = time.time()
        counts = ws.run_cleanup(h.app)
        assert counts["queue"] == 3
        recs = [r for r in h.logs.records() if r["msg"] == "Successfully completed cleanup"]
        assert len(recs) == 1 and recs[0]["level"] == "INFO" and recs[0]["removed_queue"] == 3
        assert "duration_s" in recs[0]
        m = h.app.metrics
        assert m.get("whatsignal_cleanup_duration_seconds") > 0
        assert before - 1 <= m.get("whatsignal_cleanup_last_success_timestamp_seconds") <= time.time() + 1
        status, text = http_get(h.url, "/metrics")
        assert status == 200
        assert "whatsignal_cleanup_duration_seconds " in text
        assert "whatsignal_cleanup_last_success_timestamp_seconds " in text
        assert "whatsignal_database_size_bytes " in text
        last = json.loads(store.meta("last_cleanup"))
        assert last["removed"]["queue"] == 3

    def test_cli_cleanup_prints_removed_counts(self, tmp_path, capsys):
        raw = offline_raw(tmp_path)
        cfg = write_config(tmp_path, raw)
        store = open_store(raw["database"]["path"])
        old = time.time() - 40 * DAY
        try:
            for n in range(4):
                store.enqueue("default", "w2s", "old%d" % n, KLARA, "message", {"x": n}, old)
                store.finish(last_queue_id(store), "done" if n % 2 else "dead", old)
            store.enqueue("default", "w2s", "pending", KLARA, "message", {"x": "p"}, old)
            with store.tx() as db:
                store.add_mapping(db, "default", "w2s", KLARA, "false_%s_X1" % KLARA, 1, BRIDGE, old)
        finally:
            store.close()
        rc, out, err = run_main(capsys, ["--config", cfg, "cleanup"], bridge_env())
        assert rc == 0, err
        report = json.loads(out)
        assert report["removed"]["queue"] == 4 and report["removed"]["messages"] == 1
        assert report["removed"]["media_files"] == 0
        assert db_query(raw["database"]["path"], "SELECT state FROM queue") == [("pending",)]
        rc, out, err = run_main(capsys, ["--config", cfg, "cleanup", "--vacuum"], bridge_env())
        assert rc == 0 and json.loads(out)["removed"]["queue"] == 0


# ===========================================================================
# Issue 5: backup, verify, restore
# ===========================================================================

class TestBackupRestore:

    def test_backup_while_writing_gives_a_sound_copy(self, bridge, tmp_path, capsys):
        h = bridge
        cfg = write_config(tmp_path, h.raw)
        store = h.app.store
        # enough data that the online copy takes several backup steps
        for n in range(1500):
            store.enqueue("default", "w2s", "pre%d" % n, KLARA, "message", {"body": "p" * 300}, time.time())
        stop, written = threading.Event(), [0]

        def writer():
            while not stop.is_set():
                store.enqueue("default", "w2s", "live%d" % written[0], LUKAS, "message", {"body": "w" * 300},
                              time.time())
                written[0] += 1
                time.sleep(0.002)
        t = threading.Thread(target=writer)
        t.start()
        try:
            assert eventually(lambda: written[0] >= 20, 5)
            dest = str(tmp_path / "backup.db")
            started = time.monotonic()
            rc, out, err = run_main(capsys, ["--config", cfg, "backup", dest, "--with-config"], bridge_env())
            took = time.monotonic() - started
            during = written[0]
        finally:
            stop.set()
            t.join(5)
        assert rc == 0, err
        assert took < 20
        report = json.loads(out)
        assert report["integrity"] == "ok" and report["bytes"] == os.path.getsize(dest)
        assert report["rows"]["queue"] >= 1520
        db = sqlite3.connect(dest)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            assert n == report["rows"]["queue"]
        finally:
            db.close()
        assert 1520 <= n <= 1500 + during + 1
        assert not os.path.exists(dest + ".partial")
        with open(report["config"], encoding="utf-8") as f:
            saved = f.read()
        assert WEBHOOK_SECRET not in saved and WAHA_KEY not in saved and ENC_SECRET not in saved
        assert "15550000002" not in saved
        # the copy verifies and opens with the configured secret
        rc, out, err = run_main(capsys, ["--config", cfg, "verify", dest], bridge_env())
        assert rc == 0 and json.loads(out)["key"] == "opens"

    def test_verify_reports_and_detects_a_wrong_secret(self, bridge, tmp_path, capsys):
        h = bridge
        cfg = write_config(tmp_path, h.raw)
        rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env())
        assert rc == 0, err
        report = json.loads(out)
        assert report["verdict"] == "OK" and report["integrity"] == "ok"
        assert report["schema_version"] == ws.SCHEMA_VERSION and report["key"] == "opens"
        rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env("wrong-secret-" + "z" * 32))
        assert rc == 1
        report = json.loads(out)
        assert report["verdict"] == "FAILED" and "does NOT open" in report["key"]
        rc, out, err = run_main(capsys, ["--config", cfg, "verify", str(tmp_path / "missing.db")], bridge_env())
        assert rc == 1 and json.loads(out)["verdict"] == "FAILED"

    def test_restore_refused_while_the_service_runs(self, bridge, tmp_path, capsys):
        h = bridge
        cfg = write_config(tmp_path, h.raw)
        dest = str(tmp_path / "b.db")
        assert run_main(capsys, ["--config", cfg, "backup", dest], bridge_env())[0] == 0
        db_path = h.raw["database"]["path"]
        before = os.stat(db_path).st_ino
        rc, out, err = run_main(capsys, ["--config", cfg, "restore", dest], bridge_env())
        assert rc == 2
        assert "refusing to restore" in err and "running" in err
        assert os.stat(db_path).st_ino == before
        assert not glob.glob(db_path + ".before-restore-*")
        # the running service is unharmed
        assert h.webhook(wa_message(KLARA, "AFTERREFUSE", "still here"))[0] == 200
        assert eventually(lambda: any(s.endswith("still here") for s in h.texts()))

    def test_restore_and_rotation_refused_while_a_standby_instance_serves(self, tmp_path, capsys):
        """A standby instance does not hold the delivery lease but still stores webhooks: it counts as running."""
        raw = offline_raw(tmp_path)
        cfg = write_config(tmp_path, raw)
        store = open_store(raw["database"]["path"])
        good = str(tmp_path / "good.db")
        assert run_main(capsys, ["--config", cfg, "backup", good], bridge_env())[0] == 0
        standby = ws.LeaseKeeper(store, ws.Log("error", stream=io.StringIO()), ws.new_metrics(),
                                 holder="otherhost:4242:standby")
        store.acquire_lease("otherhost:1:active", time.time(), 0.01)          # the delivery lease: expired
        standby.store.acquire_lease("otherhost:1:active", time.time() + 60, 60)  # someone else will hold it
        standby.tick()                                                          # heartbeat, not the lease
        assert not standby.leader.is_set() and store.serving(time.time()) == ["otherhost:4242:standby"]
        rc, out, err = run_main(capsys, ["--config", cfg, "restore", good], bridge_env())
        assert rc == 2 and "refusing to restore" in err and "otherhost" in err
        rc, out, err = run_main(capsys, ["--config", cfg, "rotate-key"],
                                bridge_env("new-secret-" + "n" * 32, WHATSIGNAL_ENCRYPTION_SECRET_OLD=ENC_SECRET))
        assert rc == 2 and "running" in err
        standby.stopping.set()
        standby.run()                                  # a clean stop removes the heartbeat
        assert store.serving(time.time()) == []
        store.close()

    def test_restore_refuses_a_corrupt_backup(self, tmp_path, capsys):
        raw = offline_raw(tmp_path)
        cfg = write_config(tmp_path, raw)
        open_store(raw["database"]["path"]).close()
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"SQLite format 3\x00" + os.urandom(8000))
        good = str(tmp_path / "good.db")
        assert run_main(capsys, ["--config", cfg, "backup", good], bridge_env())[0] == 0
        truncated = tmp_path / "truncated.db"
        with open(good, "rb") as f:
            truncated.write_bytes(f.read()[:5000])
        for bad in (str(garbage), str(truncated), str(tmp_path / "nope.db")):
            rc, out, err = run_main(capsys, ["--config", cfg, "restore", bad], bridge_env())
            assert rc == 2, bad
            assert "refusing to restore" in err
        # a backup made with another secret is refused as well
        assert not glob.glob(raw["database"]["path"] + ".before-restore-*")
        rc, out, err = run_main(capsys, ["--config", cfg, "restore", good], bridge_env("other-secret-" + "o" * 32))
        assert rc == 2 and "does NOT open" in err

    def test_restore_keeps_the_old_file_and_brings_back_the_backup(self, tmp_path, capsys):
        h = Harness(tmp_path).start()
        try:
            cfg = write_config(tmp_path, h.raw)
            assert h.webhook(wa_message(KLARA, "BK1", "before backup"))[0] == 200
            # recorded just after the send returns: wait for the mapping, not only the send
            assert eventually(lambda: h.app.store.one("SELECT COUNT(*) FROM messages")[0] == 1)
            dest = str(tmp_path / "b.db")
            assert run_main(capsys, ["--config", cfg, "backup", dest], bridge_env())[0] == 0
            assert h.webhook(wa_message(LUKAS, "BK2", "after backup"))[0] == 200
            assert eventually(lambda: len(h.texts()) == 2)
            h.app.stop()
            h.app = None
            db_path = h.raw["database"]["path"]
            rc, out, err = run_main(capsys, ["--config", cfg, "restore", dest], bridge_env())
            assert rc == 0, err
            report = json.loads(out)
            kept = glob.glob(db_path + ".before-restore-*")
            assert len(kept) == 1 and report["previous_kept_as"] == kept[0]
            assert db_query(kept[0], "SELECT COUNT(*) FROM messages")[0][0] == 2
            assert db_query(db_path, "SELECT COUNT(*) FROM messages")[0][0] == 1
            h.start()
            assert h.app.store.by_wa("default", "BK1")["chat"] == KLARA
            assert h.app.store.by_wa("default", "BK2") is None
            # the restored database is live: the message from after the backup is new to it again
            assert h.webhook(wa_message(LUKAS, "BK2", "after backup"))[1] == {"status": "stored"}
            assert h.webhook(wa_message(KLARA, "BK1", "before backup"))[1] == {"status": "duplicate"}
        finally:
            h.stop()


# ===========================================================================
# Issue 5: key rotation
# ===========================================================================

class TestKeyRotation:

    def test_rotate_key_keeps_replies_routing(self, tmp_path, capsys):
        h = Harness(tmp_path).start()
        try:
            cfg = write_config(tmp_path, h.raw)
            assert h.webhook(wa_message(KLARA, "ROTA1", "hi from alice", push="Alice"))[0] == 200
            assert h.webhook(wa_message(LUKAS, "ROTB1", "hi from bob", push="Bob"))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 2)
            copies = {r["message"]: r["timestamp"] for r in h.signal.requests("send")}
            ts_alice = copies["~Alice (+4915111111189): hi from alice"]      # push names: not saved contacts
            ts_bob = copies["~Bob (+4915222222278): hi from bob"]
            now = int(time.time() * 1000)
            h.signal.push(owner_env(now, "answer before rotation", quote=bridge_quote(ts_alice, "q")))
            assert h.waha.wait_for(lambda f: len(f.sent("text")) == 1)
            assert h.waha.sent("text")[0]["chatId"] == KLARA
            assert h.waha.sent("text")[0]["reply_to"] == "false_%s_ROTA1" % KLARA

            # a running service refuses rotation
            rc, out, err = run_main(capsys, ["--config", cfg, "rotate-key"],
                                    bridge_env(NEW_SECRET, WHATSIGNAL_ENCRYPTION_SECRET_OLD=ENC_SECRET))
            assert rc == 2 and "stop it" in err
            h.app.stop()
            h.app = None
            rc, out, err = run_main(capsys, ["--config", cfg, "rotate-key"],
                                    bridge_env(NEW_SECRET, WHATSIGNAL_ENCRYPTION_SECRET_OLD=ENC_SECRET))
            assert rc == 0, err
            report = json.loads(out)
            assert report["key_check"] == "updated"
            assert report["rotated"]["messages"] == 3 and report["rotated"]["queue"] == 3
            assert "rotated messages" in err

            # the old secret no longer opens it
            with pytest.raises(ws.CryptoError):
                ws.App(make_config(h.raw), ws.Log("error", stream=LogCapture()))
            h.environ = {"WHATSIGNAL_ENCRYPTION_SECRET": NEW_SECRET}
            h.start()
            h.signal.push(owner_env(now + 1000, "answer after rotation", quote=bridge_quote(ts_bob, "q")))
            assert h.waha.wait_for(lambda f: len(f.sent("text")) == 2)
            after = h.waha.sent("text")[1]
            assert after["chatId"] == LUKAS and after["text"] == "answer after rotation"
            assert after["reply_to"] == "false_%s_ROTB1" % LUKAS
            # a plain answer goes to the last forwarded chat; dedupe survived the rotation
            assert h.webhook(wa_message(KLARA, "ROTA1", "hi from alice", push="Alice"))[1] == {"status": "duplicate"}
            rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env(NEW_SECRET))
            assert rc == 0 and json.loads(out)["key"] == "opens"
        finally:
            h.stop()

    def fill(self, store):
        for n in range(7):
            chat = (KLARA, LUKAS)[n % 2]
            store.enqueue("default", "w2s", "m:%s:ID%d" % (chat, n), chat, "message", {"body": "secret %d" % n},
                          time.time())
        with store.tx() as db:
            for n in range(5):
                chat = (KLARA, LUKAS)[n % 2]
                store.add_mapping(db, "default", "w2s", chat, "false_%s_ID%d" % (chat, n), 1000 + n, BRIDGE, time.time())
        for chat, name in ((KLARA, "Alice"), (LUKAS, "Bob"), (MARTA, "Carol")):
            store.touch_chat("default", chat, time.time(), name=name)
        store.set_contact("default", KLARA, "Alice", time.time())

    def test_interrupted_rotation_is_completed_by_the_next_run(self, tmp_path, capsys):
        raw = offline_raw(tmp_path)
        cfg = write_config(tmp_path, raw)
        path = raw["database"]["path"]
        store = open_store(path)
        self.fill(store)
        store.close()

        class Boom(Exception):
            pass
        calls = []

        def progress(table, n):
            calls.append((table, n))
            raise Boom()
        store = ws.Store(path)
        try:
            with pytest.raises(Boom):
                ws.rotate_key(store, ENC_SECRET, NEW_SECRET, batch=2, progress=progress)
        finally:
            store.close()
        assert calls == [("queue", 2)]
        # half-rotated: verify says so, and neither secret opens it for serving
        rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env(NEW_SECRET))
        assert rc == 1 and "unfinished" in json.loads(out)["key"]
        rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env(ENC_SECRET))
        assert rc == 1 and "unfinished" in json.loads(out)["key"]
        with pytest.raises(ws.CryptoError):
            open_store(path, NEW_SECRET)
        with pytest.raises(ws.CryptoError, match="rotation"):
            open_store(path, ENC_SECRET).close()

        totals = []
        store = ws.Store(path)
        try:
            ws.rotate_key(store, ENC_SECRET, NEW_SECRET, batch=2, progress=lambda t, n: totals.append((t, n)))
        finally:
            store.close()
        assert ("queue", 7) in totals or ("queue", 5) in totals
        rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env(NEW_SECRET))
        assert rc == 0 and json.loads(out)["key"] == "opens"
        store = open_store(path, NEW_SECRET)
        try:
            new = store.cipher
            for table, (_, cols) in ws.SEALED.items():
                for row in store.query("SELECT * FROM %s" % table):
                    for c in cols:
                        store.open_row(row, table, c)      # raises CryptoError if any value was missed
            bodies = sorted(store.record_of(r)["body"] for r in store.query("SELECT * FROM queue"))
            assert bodies == ["secret %d" % n for n in range(7)]
            for r in store.query("SELECT * FROM queue"):
                rec = store.record_of(r)
                assert r["dedupe"] == new.token("dedupe", rec["_dedupe"]) and r["chat"] == new.token("chat", rec["_chat"])
            # lookups by token work with the new key: dedupe, mappings, chat names
            assert not store.enqueue("default", "w2s", "m:%s:ID3" % LUKAS, LUKAS, "message", {}, time.time())
            for n in range(5):
                m = store.by_wa("default", "ID%d" % n)
                assert m["chat"] == (KLARA, LUKAS)[n % 2] and m["sig_ts"] == 1000 + n
            assert store.chat_name("default", MARTA)[0] == "Carol"
            assert store.meta("rotation") is None
        finally:
            store.close()

    def test_rotate_key_with_a_wrong_old_secret_changes_nothing(self, tmp_path, capsys):
        raw = offline_raw(tmp_path)
        cfg = write_config(tmp_path, raw)
        store = open_store(raw["database"]["path"])
        self.fill(store)
        store.close()
        rc, out, err = run_main(capsys, ["--config", cfg, "rotate-key"],
                                bridge_env(NEW_SECRET, WHATSIGNAL_ENCRYPTION_SECRET_OLD="not-the-secret-" + "q" * 32))
        assert rc == 2 and "does not open" in err
        store = open_store(raw["database"]["path"])      # the original secret still opens everything
        try:
            assert len(store.query("SELECT * FROM queue")) == 7
            assert store.by_wa("default", "ID0")["chat"] == KLARA
        finally:
            store.close()


# ===========================================================================
# Issue 5: stats
# ===========================================================================

class TestStats:

    def test_stats_counts_without_plaintext(self, tmp_path, capsys):
        h = Harness(tmp_path).start()
        try:
            cfg = write_config(tmp_path, h.raw)
            for n, chat in enumerate((KLARA, LUKAS, KLARA)):
                assert h.webhook(wa_message(chat, "ST%d" % n, "stats private words %d" % n, push="Zelda"))[0] == 200
            assert eventually(lambda: len(h.texts()) == 3)
            h.signal.mode = "down"
            assert h.webhook(wa_message(LUKAS, "ST9", "stats pending words", push="Zelda"))[0] == 200
            ws.run_cleanup(h.app)
            rc, out, err = run_main(capsys, ["--config", cfg, "stats"], bridge_env())
        finally:
            h.stop()
        assert rc == 0, err
        report = json.loads(out)
        assert report["tables"]["queue"] == 4 and report["tables"]["messages"] == 3 and report["tables"]["chats"] == 2
        assert report["queue"]["w2s"]["done"] == 3 and report["queue"]["w2s"]["pending"] == 1
        assert 0 <= report["queue"]["w2s"]["oldest_pending_age_s"] < 60
        assert report["dead_letters"] == 0
        assert report["database_bytes"] > 0 and "wal_bytes" in report
        assert report["media_files"] == 0 and report["last_cleanup"]["removed"]["queue"] == 0
        for secret in ("stats private", "stats pending", "Zelda", "4915111111189", "4915222222278", "15550000002",
                       "ST0", ENC_SECRET, WEBHOOK_SECRET, WAHA_KEY):
            assert secret not in out + err


# ===========================================================================
# Issue 5: lease (two instances on one volume)
# ===========================================================================

class TestLease:

    def test_lease_keeper_takeover_with_a_fake_clock(self, tmp_path):
        clock = FakeClock()
        path = str(tmp_path / "lease.db")
        s1, s2 = ws.Store(path), ws.Store(path)
        logs = LogCapture()
        log = ws.Log("debug", stream=logs)
        try:
            a = ws.LeaseKeeper(s1, log, ws.new_metrics(), clock.time, holder="A", seconds=3.0, monotonic=clock.time)
            b = ws.LeaseKeeper(s2, log, ws.new_metrics(), clock.time, holder="B", seconds=3.0, monotonic=clock.time)
            a.tick()
            b.tick()
            assert a.leader.is_set() and not b.leader.is_set()
            assert a.metrics.get("whatsignal_leader") == 1 and b.metrics.get("whatsignal_leader") == 0
            for _ in range(5):             # A renews every second: B never gets in
                clock.advance(1.0)
                a.tick()
                b.tick()
                assert a.leader.is_set() and not b.leader.is_set()
            # A is killed (stops renewing): B waits out the lease, no longer
            clock.advance(2.9)
            b.tick()
            assert not b.leader.is_set()
            clock.advance(0.2)
            b.tick()
            assert b.leader.is_set()
            assert s1.lease_holder(clock.time()) == "B"
            # A comes back (paused process): it must step down, not deliver beside B
            a.tick()
            assert not a.leader.is_set()
            assert any(r["msg"].startswith("lease lost") for r in logs.records())
            # clean release hands over at once
            s2.release_lease("B")
            a.tick()
            assert a.leader.is_set()
            # a clock jump backwards does not let B steal a lease A holds
            clock.advance(-3600)
            a.tick()
            b.tick()
            assert a.leader.is_set() and not b.leader.is_set()
        finally:
            s1.close()
            s2.close()

    def test_two_apps_on_one_database_only_one_delivers(self, tmp_path):
        h = Harness(tmp_path).start()
        second = None
        try:
            logs2 = LogCapture()
            second = ws.App(make_config(h.raw), ws.Log("debug", stream=logs2))
            second.lease.seconds = 3.0      # ticks every second, so the takeover is quick to observe
            second.start()
            assert json.loads(http_get(h.url, "/health")[1])["role"] == "active"
            assert json.loads(http_get(second.url, "/health")[1])["role"] == "standby"
            # the standby accepts webhooks (the database serialises them); the active one delivers
            st, _ = h.waha.webhook(second.url + "/webhook/whatsapp", wa_message(KLARA, "TW1", "via standby"),
                                   WEBHOOK_SECRET)
            assert st == 200
            assert eventually(lambda: len(h.texts()) == 1)
            assert h.texts()[0].endswith("via standby")
            assert second.metrics.get("whatsignal_messages_processed_total", direction="w2s", kind="text",
                                      result="ok") == 0
            assert h.signal.wait_for(lambda f: f.stream_connections == 1, 5)
            # the standby's lease loop ran again (it still is standby): it opened no stream of its own
            passes = second.lease.rounds
            assert eventually(lambda: second.lease.rounds >= passes + 1, 10)
            assert h.signal.stream_connections == 1 and len(h.signal.calls_for("/api/v1/events")) == 1
            # the active one stops cleanly (lease released): the standby takes over within its lease period
            # and delivers what arrived meanwhile; its Signal receiver takes over the stream
            h.app.stop()
            h.app = None
            started = time.monotonic()
            st, _ = h.waha.webhook(second.url + "/webhook/whatsapp", wa_message(LUKAS, "TW2", "during takeover"),
                                   WEBHOOK_SECRET)
            assert st == 200
            assert eventually(lambda: second.lease.leader.is_set(), 5)
            assert json.loads(http_get(second.url, "/health")[1])["role"] == "active"
            assert eventually(lambda: len(h.texts()) == 2, 10)
            assert h.texts()[1].endswith("during takeover")
            assert h.signal.wait_for(lambda f: f.stream_connections == 1, 5)
            # counted just after the send returns: wait for it rather than race the worker
            assert eventually(lambda: second.metrics.get("whatsignal_messages_processed_total", direction="w2s",
                                                       kind="text", result="ok") == 1, 5)
            assert any("lease taken" in r["msg"] for r in logs2.records())
        finally:
            if second is not None:
                second.stop()
            h.stop()


# ===========================================================================
# Issue 7: crashes of the real process (kill -9, SIGTERM)
# ===========================================================================

class BridgeProcess:
    """`python whatsignal.py --config CFG serve` as a real child process (`command=()`: no command, the default);
    `environ` adds to its environment; its stdout and stderr go to one log file."""

    def __init__(self, tmp_path, raw, secret=ENC_SECRET, environ=None, command=("serve",)):
        self.port = free_port()
        raw = json.loads(json.dumps(raw))
        raw["server"]["port"] = self.port
        raw["logLevel"] = "info"
        self.raw = raw
        self.cfg = write_config(tmp_path, raw, "process-config.json")
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
                    "WHATSIGNAL_ENCRYPTION_SECRET": secret}
        self.env.update(environ or {})
        self.command = list(command)
        self.log_path = str(tmp_path / "bridge-process.log")
        self.cwd = str(tmp_path)
        self.proc = None
        self.starts = 0

    @classmethod
    def against(cls, tmp_path, fakes, **server):
        """A bridge process wired to (FakeWaha, FakeSignalDaemon); keyword arguments go to its server section."""
        waha, daemon = fakes
        return cls(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url, server=server))

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=15.0):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, WS_PATH, "--config", self.cfg] + self.command,
                                         env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        self.starts += 1
        up = lambda: self.proc.poll() is not None or http_get(self.url, "/healthz")[0] == 200
        assert eventually(up, timeout) and self.proc.poll() is None, \
            "bridge did not answer /healthz (exit code %s):\n%s" % (self.proc.returncode, self.log_tail())
        return self

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout=10.0):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n=4000):
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        return ""

    def log_records(self):
        out = []
        with contextlib.suppress(OSError):
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out


@pytest.fixture
def upstream_fakes():
    waha, daemon = FakeWaha(api_key=WAHA_KEY).start(), FakeSignalDaemon(number=BRIDGE).start()
    yield waha, daemon
    daemon.stop()
    waha.stop()


LOAD_CHATS = (KLARA, LUKAS, MARTA, "4915444444456@c.us")
LOAD_W2S_RE = re.compile(r"w2s (\d+)$")


class TwoWayLoad:
    """Both directions of load against a bridge that may die at any moment.

    WhatsApp side: signed webhooks, resent until answered 200 (as WAHA retries).
    Signal side: owner envelopes pushed on the fake daemon's SSE stream.
    """

    def __init__(self, url, daemon, n, pace=0.008, first=0):
        self.url, self.daemon, self.n, self.pace, self.first = url, daemon, n, pace, first
        self.stop = threading.Event()
        self.acked = 0
        self.resent = 0
        self.ts0 = int(time.time() * 1000) + 10000
        self.pushed = {}
        self.threads = [threading.Thread(target=self.w2s, daemon=True), threading.Thread(target=self.s2w, daemon=True)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def w2s(self):
        poster = WebhookPoster(self.url, timeout=5)
        try:
            for i in range(self.first, self.first + self.n):
                ev = wa_message(LOAD_CHATS[i % 4], "K%05d" % i, "w2s %d" % i, push="P%d" % (i % 4))
                while not self.stop.is_set():
                    try:
                        status = poster.post(ev)[0]
                    except (OSError, http.client.HTTPException):
                        status = None
                    if status == 200:
                        self.acked += 1
                        break
                    self.resent += 1
                    time.sleep(0.02)
                time.sleep(self.pace)
        finally:
            poster.close()

    def s2w(self):
        for j in range(self.first, self.first + self.n):
            if self.stop.is_set():
                return
            ts = self.ts0 + j
            self.pushed[ts] = j
            self.daemon.push(owner_env(ts, "s2w %d" % j))
            time.sleep(self.pace)

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


def tally(texts, pattern):
    counts = collections.Counter()
    for t in texts:
        m = pattern.search(t or "")
        if m:
            counts[int(m.group(1))] += 1
    return counts


class TestCrashes:

    def test_kill_9_at_random_points_loses_nothing(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        rng = random.Random(20260101)
        n = 300             # enough to keep both directions busy across every kill; each one is checked
        owner_re = re.compile(r"s2w (\d+)$")
        bridge = BridgeProcess(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url))
        load = None
        try:
            bridge.start()
            # one forwarded message first, so the owner's plain answers have a chat to go to
            assert waha.webhook(bridge.url + "/webhook/whatsapp", wa_message(KLARA, "WARM", "warm up"),
                                WEBHOOK_SECRET)[0] == 200
            assert daemon.wait_for(lambda f: len(f.sent()) == 1, 10)
            assert eventually(lambda: db_query(bridge.raw["database"]["path"],
                                            "SELECT COUNT(*) FROM messages")[0][0] == 1, 10)   # recorded, not just sent
            kills = rng.randint(3, 5)
            uptimes = [rng.uniform(0.4, 1.4) for _ in range(kills)]
            load = TwoWayLoad(bridge.url, daemon, n, pace=0.008).start()
            active_at_kill = 0
            for up in uptimes:
                time.sleep(up)
                with contextlib.suppress(OSError, ValueError):
                    active_at_kill += json.loads(http_get(bridge.url, "/health")[1])["role"] == "active"
                bridge.kill()
                bridge.start()
            assert load.join(60), "load generators did not finish"

            def tallies():
                return (tally([p.get("message") for p in daemon.sent()], LOAD_W2S_RE),
                        tally([b.get("text") for b in waha.sent("text")], owner_re))

            def done():
                w, s = tallies()
                return len(w) == n and len(s) == n

            def written():
                return {e["envelope"]["timestamp"] for e in list(daemon.delivered)}
            # wait until everything arrived, or the bridge is connected, idle and makes no more progress
            deadline, last, still_since = time.monotonic() + 40, None, time.monotonic()
            while time.monotonic() < deadline and not done():
                now_seen = tuple(len(t) for t in tallies())
                if now_seen != last or daemon.pending or daemon.stream_connections < 1:
                    last, still_since = now_seen, time.monotonic()
                elif time.monotonic() - still_since > 1.5:
                    break
                time.sleep(0.1)
            # on-connection mode: an envelope the daemon never wrote to a stream (the fake drops what it had
            # queued for a stream that died before the write) is still signal-cli's to deliver: offer it again
            never = []
            if not done():
                never = [ts for ts in load.pushed if ts not in written()]
                for ts in never:
                    daemon.push(owner_env(ts, "s2w %d" % load.pushed[ts]))
                if never:      # those offered again arrive (what was in flight at a kill may still be missing)
                    eventually(lambda: all(load.pushed[ts] in tallies()[1] for ts in never), 10)
            w2s, s2w = tallies()
            lost_w2s = sorted(set(range(n)) - set(w2s))
            missing_s2w = sorted(set(range(n)) - set(s2w))
            # an envelope signal-cli wrote to a stream whose reader was then killed was in flight: SSE has no
            # acknowledgement, so the contract itself cannot bring it back (every stream but the last one ended
            # with a kill).  An envelope never written, or written and still missing without a kill, is a loss.
            # in flight = the unread tail of a stream that a kill ended: written to it, and nothing written to
            # that stream after it reached the bridge either (a stream is read in order)
            writes = [(e["envelope"]["timestamp"], serial)
                      for e, serial in zip(list(daemon.delivered), list(daemon.delivered_on))]
            last_stream = max(serial for _, serial in writes)
            arrived = {load.ts0 + j for j in s2w}
            in_flight = [j for j in missing_s2w
                         if any(ts == load.ts0 + j and serial != last_stream
                                and not any(t2 in arrived for t2, s2 in writes[k + 1:] if s2 == serial)
                                for k, (ts, serial) in enumerate(writes))]
            lost_s2w = [j for j in missing_s2w if j not in in_flight]
            dup_w2s = sum(c - 1 for c in w2s.values())
            dup_s2w = sum(c - 1 for c in s2w.values())
            assert lost_w2s == [], "acknowledged webhooks lost: %s" % lost_w2s[:20]
            assert lost_s2w == [], "owner messages lost: %s" % lost_s2w[:20]
            # each direction delivers one item at a time: a kill can repeat at most the one in flight
            assert dup_w2s <= kills and dup_s2w <= kills
            # order per chat: the first appearances of each chat's messages are in sending order
            order = [int(LOAD_W2S_RE.search(p["message"]).group(1)) for p in daemon.sent()
                     if LOAD_W2S_RE.search(p.get("message") or "")]
            for c in range(4):
                firsts = []
                for i in order:
                    if i % 4 == c and i not in firsts:
                        firsts.append(i)
                assert firsts == sorted(firsts), "chat %d out of order" % c
            for p in daemon.sent():
                m = LOAD_W2S_RE.search(p.get("message") or "")
                if m:
                    k = int(m.group(1)) % 4
                    assert p["message"] == "%s: w2s %s" % (shown_everywhere("P%d" % k, LOAD_CHATS[k]), m.group(1))
                    assert p["recipient"] == [OWNER]
            for b in waha.sent("text"):
                if owner_re.search(b["text"]):
                    assert b["session"] == "default" and b["chatId"] in LOAD_CHATS
            db = bridge.raw["database"]["path"]
            assert eventually(lambda: db_query(db, "SELECT COUNT(*) FROM queue WHERE state!='done'")[0][0] == 0, 10)
        finally:
            if load is not None:
                load.stop.set()
                load.join(10)
            bridge.stop()

    def test_restart_after_kill_9_resumes_delivery_promptly(self, tmp_path, upstream_fakes):
        """A crashed instance's lease must not keep its own restart idle for LEASE_SECONDS."""
        waha, daemon = upstream_fakes
        bridge = BridgeProcess(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url))
        try:
            bridge.start()
            assert waha.webhook(bridge.url + "/webhook/whatsapp", wa_message(KLARA, "RK1", "before"),
                                WEBHOOK_SECRET)[0] == 200
            assert daemon.wait_for(lambda f: len(f.sent()) == 1, 10)
            bridge.kill()
            bridge.start()
            started = time.monotonic()
            assert waha.webhook(bridge.url + "/webhook/whatsapp", wa_message(KLARA, "RK2", "after"),
                                WEBHOOK_SECRET)[0] == 200
            # (the kill may land between the first send and its record: that one may come again, once)
            delivered = daemon.wait_for(lambda f: any(p["message"].endswith(": after") for p in f.sent()), 5)
            took = time.monotonic() - started
            assert delivered, "restarted bridge still standby after %.1f s (lease of the killed process)" % took
            assert json.loads(http_get(bridge.url, "/health")[1])["role"] == "active"
            assert len(daemon.sent()) <= 3
        finally:
            bridge.stop()

    def test_sigterm_during_load_exits_0_and_loses_nothing(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        n = 120             # SIGTERM lands after 30 are acknowledged; the rest arrive after the restart
        bridge = BridgeProcess(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url))
        db = bridge.raw["database"]["path"]
        load = None
        try:
            bridge.start()
            assert waha.webhook(bridge.url + "/webhook/whatsapp", wa_message(KLARA, "WARM", "warm up"),
                                WEBHOOK_SECRET)[0] == 200
            assert daemon.wait_for(lambda f: len(f.sent()) == 1, 10)
            assert daemon.wait_for(lambda f: f.stream_connections == 1, 10)
            # the owner answers the forwarded message: only once the bridge has recorded it (ms after the send)
            assert eventually(lambda: db_query(db, "SELECT COUNT(*) FROM messages")[0][0] == 1, 10)
            waha.mode = "down"             # the owner's messages are stored but cannot leave yet
            ts0 = int(time.time() * 1000)
            for j in range(50):
                daemon.push(owner_env(ts0 + j, "s2w %d" % j))
            assert eventually(lambda: db_query(db, "SELECT COUNT(*) FROM queue WHERE direction='s2w'")[0][0] == 50, 10)
            load = TwoWayLoad(bridge.url, daemon, n, pace=0.01, first=1000)
            load.threads = load.threads[:1]          # WhatsApp side only: the Signal side is queued above
            load.start()
            assert eventually(lambda: load.acked >= 30, 10)
            started = time.monotonic()
            rc = bridge.terminate(10)
            took = time.monotonic() - started
            acked_at_stop = load.acked
            assert rc == 0, bridge.log_tail()
            # nothing acknowledged is missing from the database; the owner's messages wait, queued
            stored = db_query(db, "SELECT COUNT(*) FROM queue WHERE direction='w2s'")[0][0]
            assert stored >= acked_at_stop + 1
            assert db_query(db, "SELECT state, COUNT(*) FROM queue WHERE direction='s2w' GROUP BY state") == [("pending", 50)], db_query(db, "SELECT state, error, kind FROM queue WHERE direction='s2w' AND state!='pending'")
            assert db_query(db, "SELECT COUNT(*) FROM lease WHERE holder != ''")[0][0] == 0, "lease not released on SIGTERM"
            recs = bridge.log_records()
            assert any(r["msg"] == "WhatSignal stopped" for r in recs)
            waha.mode = "ok"
            bridge.start()
            assert load.join(30)
            assert eventually(lambda: len(tally([p.get("message") for p in daemon.sent()], LOAD_W2S_RE)) == n, 20)
            assert eventually(lambda: len(tally([b.get("text") for b in waha.sent("text")],
                                                  re.compile(r"s2w (\d+)$"))) == 50, 20)
            w2s = tally([p.get("message") for p in daemon.sent()], LOAD_W2S_RE)
            s2w = tally([b.get("text") for b in waha.sent("text")], re.compile(r"s2w (\d+)$"))
            assert sorted(w2s) == list(range(1000, 1000 + n)) and set(w2s.values()) == {1}
            assert sorted(s2w) == list(range(50)) and set(s2w.values()) == {1}
            # the owner's messages left in the order they were written
            assert [int(b["text"].split()[1]) for b in waha.sent("text")] == list(range(50))
        finally:
            if load is not None:
                load.stop.set()
                load.join(10)
            bridge.stop()


# ===========================================================================
# Issue 7: upstream outages, database faults, clock jumps
# ===========================================================================

class TestCrashesUnderConcurrentWebhooks:

    def test_kill_9_during_group_commits_loses_nothing_acknowledged(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        bridge = BridgeProcess(tmp_path, raw_config(tmp_path, waha.url, rpc_url=daemon.url))
        acked, lock, stop = set(), threading.Lock(), threading.Event()

        def post(t):
            poster = WebhookPoster(bridge.url, timeout=5)
            try:
                for i in range(100000):
                    if stop.is_set():
                        return
                    text = "burst %d-%d" % (t, i)
                    try:
                        status, body, _ = poster.post(wa_message(LOAD_CHATS[t % 4], "GC%02d%06d" % (t, i), text))
                    except (OSError, http.client.HTTPException):
                        return                                  # the bridge died under this request
                    if status == 200 and json.loads(body) == {"status": "stored"}:
                        with lock:
                            acked.add(text)
            finally:
                poster.close()

        threads = [threading.Thread(target=post, args=(t,), daemon=True) for t in range(12)]
        try:
            bridge.start()
            for t in threads:
                t.start()
            assert eventually(lambda: len(acked) >= 300, 30), "the bridge acknowledged too little under load"
            bridge.kill()                                       # in the middle of the concurrent posts
            stop.set()
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)
            store = open_store(bridge.raw["database"]["path"])
            try:
                stored = [m.group(0) for r in store.query("SELECT * FROM queue WHERE direction='w2s'")
                          for m in [re.search(r"burst \d+-\d+", store.open_row(r, "queue", "body"))] if m]
            finally:
                store.close()
            missing = sorted(acked - set(stored))
            assert missing == [], "acknowledged, then lost in the kill: %s" % missing[:10]
            assert len(stored) == len(set(stored)), "a webhook was stored twice"
        finally:
            stop.set()
            bridge.stop()


class ClockTicker:
    """Moves a FakeClock along with real time (for phases that must look like real time passing)."""

    def __init__(self, clock, step=0.05):
        self.clock, self.step = clock, step
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(self.step):
            self.clock.advance(self.step)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)


def kick(h, clock, seconds=400.0):
    """Jump the fake clock past any backoff and wake the delivery workers."""
    clock.advance(seconds)
    for ev in h.app.bridge.wake.values():
        ev.set()


class TestOutages:

    def test_signal_cli_down_slow_failing_then_back(self, tmp_path):
        clock = FakeClock(start=time.time())
        h = Harness(tmp_path, clock=clock.time).start()
        try:
            h.app.signal.http.timeout = 0.3            # client timeout, so "slow" means "after the timeout"
            h.signal.slow_seconds = 60.0               # a slow answer never comes back during the test
            assert h.signal.wait_for(lambda f: f.stream_connections == 1, 5)
            h.signal.mode = "down"
            plan = [(KLARA, "A1"), (LUKAS, "B1"), (KLARA, "A2"), (LUKAS, "B2"), (KLARA, "A3")]
            calls_before = len(h.signal.calls)
            with ClockTicker(clock):
                for chat, text in plan:
                    assert h.webhook(wa_message(chat, "OUT" + text, "outage " + text, push="N"))[0] == 200
                time.sleep(3.0)                        # three seconds of outage, in real time
            during = len(h.signal.calls) - calls_before
            assert 2 <= during < 20, "%d requests to signal-cli during 3 s of outage" % during
            assert h.texts() == []

            def retries(reason):
                return sum(1 for r in h.logs.records()
                           if r["msg"] == "delivery failed, will retry" and reason in r.get("reason", ""))
            # one chat head of each chat is retried per phase; the others wait their turn (order per chat)
            for mode, reason in (("slow", "timeout"), ("http500", "HTTP 500")):
                h.signal.mode = mode
                kick(h, clock)
                assert eventually(lambda: retries(reason) >= 2, 5), mode
                worker = next(w for w in h.app.workers if isinstance(w, ws.Deliverer) and w.direction == "w2s")
                passes = worker.passes
                # woken without a clock jump, the worker passes the queue twice more: nothing more is due
                assert eventually(lambda: worker.wake.set() or worker.passes >= passes + 2, 5)
                assert retries(reason) == 2, mode
            assert h.texts() == []
            pending = h.app.store.query("SELECT attempts, next_at FROM queue WHERE state='pending'")
            assert len(pending) == 5
            assert all(r["next_at"] - clock.time() <= ws.BACKOFF_CAP for r in pending)
            h.signal.mode = "ok"
            kick(h, clock)
            assert eventually(lambda: len(h.texts()) == 5, 10)
            sends = h.texts()
            assert sorted(sends) == sorted(shown_everywhere("N", c) + ": outage " + t for c, t in plan)
            a, b = shown_everywhere("N", KLARA), shown_everywhere("N", LUKAS)
            assert [s for s in sends if "A" in s.split()[-1]] == [a + ": outage A1", a + ": outage A2", a + ": outage A3"]
            assert [s for s in sends if "B" in s.split()[-1]] == [b + ": outage B1", b + ": outage B2"]
            assert h.app.store.query("SELECT COUNT(*) FROM queue WHERE state!='done'")[0][0] == 0
            assert not [r for r in h.logs.records() if r["level"] == "ERROR" and "internal" in r["msg"]]
        finally:
            h.stop()

    def test_waha_down_failing_then_back(self, tmp_path):
        clock = FakeClock(start=time.time())
        h = Harness(tmp_path, clock=clock.time).start()
        try:
            h.app.waha.http.timeout = 0.3
            assert h.webhook(wa_message(KLARA, "WD0", "hello", push="Alice"))[0] == 200
            assert eventually(lambda: len(h.texts()) == 1)
            h.waha.mode = "down"
            before = len(h.waha.calls)
            ts = int(time.time() * 1000)
            with ClockTicker(clock):
                for k in range(3):
                    h.signal.push(owner_env(ts + k, "owner says %d" % k))
                time.sleep(2.0)
            during = len(h.waha.calls) - before
            assert 1 <= during < 15, "%d requests to WAHA during 2 s of outage" % during
            h.waha.mode = "error"
            seen = len(h.waha.calls)
            kick(h, clock)
            assert h.waha.wait_for(lambda f: len(f.calls) > seen, 5)
            assert eventually(lambda: any(r["msg"] == "delivery failed, will retry" and "500" in r["reason"]
                                        for r in h.logs.records()), 5)
            assert h.waha.sent("text") == []
            h.waha.mode = "ok"
            kick(h, clock)
            assert h.waha.wait_for(lambda f: len(f.sent("text")) >= 3, 10), (
                h.waha.sent("text"), [r for r in h.logs.records() if r["level"] != "DEBUG"][-6:],
                [tuple(r) for r in h.app.store.query("SELECT id, state, attempts, next_at - ?, error FROM queue",
                                                     (clock.time(),))])
            assert [b["text"] for b in h.waha.sent("text")] == ["owner says 0", "owner says 1", "owner says 2"]
            assert all(b["chatId"] == KLARA for b in h.waha.sent("text"))
            # the owner was not told about a failure: a delay is not an error
            assert h.texts() == [shown_everywhere("Alice") + ": hello"]
        finally:
            h.stop()

    def test_database_locked_answers_503_and_recovers(self, bridge):
        h = bridge
        store = h.app.store
        with store.lock:
            store.db.execute("PRAGMA busy_timeout=200")
        blocker = sqlite3.connect(h.raw["database"]["path"], isolation_level=None, timeout=5)
        try:
            blocker.execute("BEGIN IMMEDIATE")       # another writer holds the database
            statuses = []
            for k in range(3):
                status, body = h.webhook(wa_message(KLARA, "LK%d" % k, "locked %d" % k))
                statuses.append(status)
                assert body == {"error": "storage unavailable, retry later"}
            assert statuses == [503, 503, 503]
            assert blocker.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0   # nothing half-stored
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert any(r["level"] == "ERROR" and "503" in r["msg"] for r in h.logs.records())
        for k in range(3):                          # WAHA retries: now they are stored, once
            assert h.webhook(wa_message(KLARA, "LK%d" % k, "locked %d" % k))[1] == {"status": "stored"}
        assert eventually(lambda: len(h.texts()) == 3)
        assert [s.split(": ", 1)[1] for s in h.texts()] == ["locked 0", "locked 1", "locked 2"]
        assert json.loads(http_get(h.url, "/health")[1])["checks"]["database"]["status"] == "ok"

    def test_disk_full_answers_503_and_recovers(self, bridge):
        h = bridge
        store = h.app.store
        assert h.webhook(wa_message(KLARA, "DF0", "fits"))[0] == 200
        assert eventually(lambda: len(h.texts()) == 1)
        with store.lock:
            pages = store.db.execute("PRAGMA page_count").fetchone()[0]
            store.db.execute("PRAGMA max_page_count=%d" % pages)     # the disk is full from here on
        big = "x" * 300000
        try:
            for k in range(2):
                status, body = h.webhook(wa_message(LUKAS, "DF%d" % (k + 1), big + str(k)))
                assert status == 503 and body == {"error": "storage unavailable, retry later"}
            assert store.query("SELECT COUNT(*) FROM queue")[0][0] == 1
        finally:
            with store.lock:
                store.db.execute("PRAGMA max_page_count=1073741823")
        for k in range(2):
            assert h.webhook(wa_message(LUKAS, "DF%d" % (k + 1), big + str(k)))[1] == {"status": "stored"}
        assert eventually(lambda: len(h.texts()) == 3)
        assert [len(s) for s in h.texts()[1:]] == [len(h.texts()[1])] * 2
        assert h.texts()[1].endswith(big + "0") and h.texts()[2].endswith(big + "1")

    def test_clock_jumps_do_not_break_retries_dedupe_or_retention(self, tmp_path):
        clock = FakeClock(start=T0)
        waha, daemon = FakeWaha(api_key=WAHA_KEY).start(), FakeSignalDaemon(number=BRIDGE).start()
        app = None
        try:
            config = make_config(raw_config(tmp_path, waha.url, rpc_url=daemon.url))
            app = ws.App(config, ws.Log("debug", stream=LogCapture()), clock=clock.time)   # not started
            leader = threading.Event()
            leader.set()
            d = ws.Deliverer(app.bridge, "w2s", leader, clock=clock.time, rand=lambda: 0.5)
            sends = lambda: [p["message"] for p in daemon.sent()]
            assert app.bridge.ingest_webhook(wa_message(KLARA, "CJ1", "jump one", push="A")) == "stored"
            daemon.mode = "down"
            d.run_once()
            row = app.store.one("SELECT * FROM queue")
            assert row["attempts"] == 1 and row["next_at"] > clock.time()
            # the clock goes back a day: the retry is not postponed by a day
            clock.advance(-DAY)
            daemon.mode = "ok"
            d.run_once()
            assert sends() == [shown_everywhere("A") + ": jump one"]
            # dedupe does not depend on the clock
            assert app.bridge.ingest_webhook(wa_message(KLARA, "CJ1", "jump one", push="A")) == "duplicate"
            clock.advance(2 * DAY)
            assert app.bridge.ingest_webhook(wa_message(KLARA, "CJ1", "jump one", push="A")) == "duplicate"
            # an ordinary backoff still waits ...
            assert app.bridge.ingest_webhook(wa_message(LUKAS, "CJ2", "jump two", push="B")) == "stored"
            daemon.mode = "down"
            d.run_once()
            tries = len(daemon.calls_for("/api/v1/rpc"))
            daemon.mode = "ok"
            d.run_once()
            assert len(daemon.calls_for("/api/v1/rpc")) == tries and sends() == [shown_everywhere("A") + ": jump one"]
            # ... and a jump forward makes it due at once
            clock.advance(3600)
            d.run_once()
            assert sends() == [shown_everywhere("A") + ": jump one", shown_everywhere("B", LUKAS) + ": jump two"]
            # retention follows the clock it is given, and never takes what is pending
            daemon.mode = "down"
            assert app.bridge.ingest_webhook(wa_message(MARTA, "CJ3", "jump three", push="C")) == "stored"
            d.run_once()
            clock.advance(-10 * DAY)              # back in time: every row looks like it is from the future
            assert ws.cleanup(app.store, config, clock.time())["queue"] == 0
            clock.advance(100 * DAY)              # far forward: old done rows go, the pending one stays
            counts = ws.cleanup(app.store, config, clock.time())
            assert counts["queue"] == 2 and counts["messages"] == 2
            left = app.store.query("SELECT state FROM queue")
            assert [r[0] for r in left] == ["pending"]
        finally:
            if app is not None:
                app.store.close()
            daemon.stop()
            waha.stop()


# ===========================================================================
# Issue 7: fuzzing every fixture
# ===========================================================================

SIGNAL_FIXTURES = sorted(f for f in os.listdir(FIXTURES) if f.startswith("signal-envelope-"))


class Fuzzer:
    """Seeded structural mutations of JSON documents, serialised in hostile ways."""

    ODD = ["", " ", "\u202e\u200b\ufeff", "\U0001d54f\U0001f3f3\ufe0f\u200d\U0001f308", "\u0000", "a\u0000b",
           "../../etc/passwd", "/etc/shadow", "%s%n%x", "\ud800", "x\udfffy", "null", "true", "-1", "1e309", "0x10",
           "+4915111111189", "false_1@c.us_X", "true_@c.us_", "@c.us", "x@g.us", "123@lid", "status@broadcast",
           "file:///etc/passwd", "http://169.254.169.254/", "\r\nX-Injected: 1", "<script>", "\\", "\"", "e" * 257]

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def leaf(self):
        r = self.rng
        return r.choice([None, True, False, 0, -1, 1.5, 2 ** 63, -2 ** 70, 1e308, float(r.randint(0, 9)),
                         r.choice(self.ODD), "x" * r.choice((1000, 100000)), [], {}, [None], {"": None},
                         "__OPS_DEEP_%d__" % r.choice((40, 400, 5000, 60000)), r.randint(-2 ** 31, 2 ** 53)])

    def nodes(self, obj, out):
        if isinstance(obj, dict):
            for k in list(obj):
                out.append((obj, k))
                self.nodes(obj[k], out)
        elif isinstance(obj, list):
            for i in range(len(obj)):
                out.append((obj, i))
                self.nodes(obj[i], out)
        return out

    def mutate(self, doc):
        doc = copy.deepcopy(doc)
        r = self.rng
        for _ in range(r.randint(1, 4)):
            nodes = self.nodes(doc, [])
            if not nodes:
                break
            parent, key = r.choice(nodes)
            v = parent[key]
            op = r.randrange(9)
            if op == 0:
                del parent[key]
            elif op == 1:
                parent[key] = self.leaf()
            elif op == 2:                         # numbers as strings and back
                if isinstance(v, bool) or v is None:
                    parent[key] = str(v).lower()
                elif isinstance(v, (int, float)):
                    parent[key] = str(v)
                elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
                    parent[key] = int(v)
                else:
                    parent[key] = len(str(v))
            elif op == 3 and isinstance(parent, dict):
                parent[r.choice(("extra", "__proto__", "id", "_data", "constructor", "\u0000"))] = self.leaf()
            elif op == 4:
                parent[key] = [v]
            elif op == 5:
                parent[key] = {"_serialized": v, "id": v}
            elif op == 6 and isinstance(v, str):
                parent[key] = v + r.choice(self.ODD)
            elif op == 7:
                parent[key] = r.choice((True, False, None))
            else:
                parent[key] = "__OPS_DEEP_%d__" % r.choice((40, 400, 5000))
        return doc

    def serialize(self, doc):
        r = self.rng
        ascii_ = r.random() < 0.5
        text = json.dumps(doc, ensure_ascii=ascii_)
        for m in set(re.findall(r'"__OPS_DEEP_(\d+)__"', text)):
            depth = int(m)
            nest = ("[" * depth + "]" * depth) if r.random() < 0.5 else ('{"a":' * depth + "1" + "}" * depth)
            text = text.replace('"__OPS_DEEP_%s__"' % m, nest)
        data = text.encode("utf-8", "surrogatepass")   # lone surrogates: escaped, or raw (invalid UTF-8)
        if r.random() < 0.08 and data:            # byte-level damage
            pos = r.randrange(len(data))
            data = data[:pos] + bytes([r.randrange(256)]) + data[pos + 1:] if r.random() < 0.5 else data[:pos]
        return data


def envelope_of(doc):
    if isinstance(doc, dict):
        if isinstance(doc.get("envelope"), dict):
            return doc["envelope"]
        for v in doc.values():
            e = envelope_of(v)
            if e is not None:
                return e
    return None


def drain_with_clock(h, clock, timeout=20.0):
    """Jump the fake clock past every backoff until no item is pending; return the pending count left."""
    pending = lambda: h.app.store.query("SELECT COUNT(*) FROM queue WHERE state='pending'")[0][0]

    def empty():
        if pending():
            kick(h, clock, 4 * 3600)
            return False
        return True
    eventually(empty, timeout)
    return pending()


class TestFuzz:

    def test_fuzzed_webhooks_and_envelopes_never_crash_anything(self, tmp_path):
        clock = FakeClock(start=time.time())
        h = Harness(tmp_path, clock=clock.time).start()
        try:
            h.app.waha.http.timeout = 2.0
            h.app.signal.http.timeout = 2.0
            waha_docs = [fixture(f) for f in WAHA_FIXTURES]
            sig_docs = [fixture(f) for f in SIGNAL_FIXTURES]
            assert len(waha_docs) >= 10 and len(sig_docs) >= 10
            statuses, cases = collections.Counter(), 0
            poster = WebhookPoster(h.url)
            unexpected = []
            for seed in (11, 12, 13):
                fz = Fuzzer(seed)
                for k in range(700):
                    base = copy.deepcopy(waha_docs[k % len(waha_docs)])
                    if isinstance(base.get("payload"), dict) and fz.rng.random() < 0.6:
                        base["payload"]["fromMe"] = False
                        if fz.rng.random() < 0.3:
                            base["payload"]["id"] = "false_%s_FZ%d%d" % (KLARA, seed, k)
                    body = fz.serialize(fz.mutate(base))
                    status, data, _ = poster.post(body)
                    statuses[status] += 1
                    cases += 1
                    if status not in (200, 400):
                        unexpected.append((seed, k, status, data[:200]))
            poster.close()
            problems = {"webhook answers other than 200/400": unexpected}
            assert cases >= 2000 and statuses[200] > 100 and statuses[400] > 100
            rejected_logs = [r for r in h.logs.records() if r["msg"] == "webhook rejected" and r["status"] == 400]
            assert len(rejected_logs) == statuses[400]       # every rejection logged once, with a reason
            assert all(r.get("reason") for r in rejected_logs)

            # the same for Signal envelopes, straight into the bridge and over the SSE stream
            outcomes, raised, env_cases, sse_cases = collections.Counter(), [], 0, 0
            before = sum(1 for r in h.logs.records() if r["msg"] == "malformed signal envelope rejected")
            for seed in (21, 22, 23):
                fz = Fuzzer(seed)
                for k in range(900):
                    base = copy.deepcopy(sig_docs[k % len(sig_docs)])
                    env = envelope_of(base)
                    if env is not None and fz.rng.random() < 0.6:
                        env["source"] = env["sourceNumber"] = OWNER
                        env["sourceUuid"] = "a1b2c3d4-e5f6-4a1b-9c2d-3e4f5a6b7c8d"
                        env["timestamp"] = 1767225600000 + seed * 10000 + k
                    data = fz.serialize(fz.mutate(base))
                    try:
                        obj = json.loads(data.decode("utf-8"))
                    except (ValueError, UnicodeDecodeError, RecursionError):
                        continue                         # the transports never hand undecodable JSON over
                    env_cases += 1
                    try:
                        outcomes[h.app.bridge.ingest_envelope(obj)] += 1
                    except Exception as e:  # noqa: BLE001 - that is what is being tested
                        raised.append((seed, k, e.__class__.__name__, str(e)[:120]))
                        h.signal.push(obj)              # and the same input on the live stream
                        sse_cases += 1
                    if k % 7 == 0:
                        h.signal.push(obj)
                        sse_cases += 1
            problems["ingest_envelope raised"] = raised
            assert env_cases >= 2000
            assert set(outcomes) <= {"stored", "duplicate", "ignored", "unauthorized", "rejected"}
            assert outcomes["stored"] > 100 and outcomes["rejected"] > 10
            after = sum(1 for r in h.logs.records() if r["msg"] == "malformed signal envelope rejected")
            assert after - before >= outcomes["rejected"]

            # afterwards: no stuck item, no dead worker, and real traffic still flows both ways
            assert drain_with_clock(h, clock) == 0, "items stuck pending after the fuzz"
            assert all(w.thread.is_alive() for w in h.app.workers)
            problems["worker crashes / internal errors logged"] = [
                r for r in h.logs.records() if "crashed" in r["msg"] or "internal error" in r["msg"]]
            h.signal.clear()
            h.waha.clear()
            assert h.webhook(wa_message(KLARA, "AFTERFUZZ", "after the fuzz", push="Alice"))[1] == {"status": "stored"}
            assert eventually(lambda: shown_everywhere("Alice") + ": after the fuzz" in h.texts(), 10)
            assert h.signal.wait_for(lambda f: f.stream_connections == 1, 10)
            h.signal.push(owner_env(int(time.time() * 1000), "owner after the fuzz"))
            assert h.waha.wait_for(lambda f: any(b["text"] == "owner after the fuzz" for b in f.sent("text")), 10)
            assert not any(problems.values()), {k: v[:3] for k, v in problems.items() if v}
        finally:
            h.stop()


# ===========================================================================
# Issue 7: HTTP abuse on raw sockets
# ===========================================================================

def raw_exchange(url, data, shut=False, timeout=5.0, pause=None):
    """Send raw bytes; return (status or None, the raw answer, seconds to the answer)."""
    u = urllib.parse.urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=timeout)
    started = time.monotonic()
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if m and len(rest) >= int(m.group(1)):
                    break
        took = time.monotonic() - started
    finally:
        s.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", out)
    return (int(m.group(1)) if m else None), out, took


def raw_request(path, body=b"", method="POST", headers=None, signed=True):
    hdrs = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    if signed:
        hdrs["X-Webhook-Hmac"] = sign(body)
        hdrs["X-Webhook-Hmac-Algorithm"] = "sha512"
    for k, v in (headers or {}).items():
        hdrs.pop(k, None)
        if v is not None:
            hdrs[k] = v
    head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in hdrs.items()) + "\r\n"
    return head.encode("latin-1") + body


class TestHttpAbuse:

    def test_malformed_requests_get_4xx_never_500(self, bridge):
        h = bridge
        ok_body = body_of(wa_message(KLARA, "AB1", "abuse"))
        cases = [
            # one word: the standard library answers HTTP/0.9 style (body only, no status line)
            ("garbage request line", b"HELLO\r\n\r\n", (400, None)),
            ("request line with extra words", b"GET /healthz HTTP/1.1 extra words\r\n\r\n", (400, None)),
            ("binary request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32, 96)) + b"\r\n\r\n",
             (400, None)),
            ("HTTP/2 request line", b"GET /healthz HTTP/2.0\r\n\r\n", (505, None)),
            ("HTTP/9.9 request line", b"GET /healthz HTTP/9.9\r\n\r\n", (505, None)),
            ("request line too long", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", (414,)),
            ("header line too long", b"GET /healthz HTTP/1.1\r\nX-Long: " + b"b" * 70000 + b"\r\n\r\n", (431, 400)),
            ("too many headers", b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
             (431, 400)),
            ("header without a colon", b"POST /webhook/whatsapp HTTP/1.1\r\nContent-Length: 2\r\nNoColonHere\r\n\r\n{}",
             (400, 401, 411, 415)),
            ("unknown method", b"BREW /webhook/whatsapp HTTP/1.1\r\n\r\n", (501,)),
            ("missing Content-Length", raw_request("/webhook/whatsapp", headers={"Content-Length": None}), (411,)),
            ("non-numeric Content-Length", raw_request("/webhook/whatsapp", b"{}", headers={"Content-Length": "12abc"}),
             (400,)),
            ("negative Content-Length", raw_request("/webhook/whatsapp", b"{}", headers={"Content-Length": "-1"}), (400,)),
            ("chunked body", raw_request("/webhook/whatsapp", headers={"Content-Length": None,
                                                                        "Transfer-Encoding": "chunked"})
             + b"2\r\n{}\r\n0\r\n\r\n", (411,)),
            ("wrong content type", raw_request("/webhook/whatsapp", ok_body, headers={"Content-Type": "text/plain"}), (415,)),
            ("unsigned", raw_request("/webhook/whatsapp", ok_body, signed=False), (401,)),
            ("wrong algorithm", raw_request("/webhook/whatsapp", ok_body, headers={"X-Webhook-Hmac-Algorithm": "md5"}),
             (401,)),
            ("signed malformed JSON", raw_request("/webhook/whatsapp", b"{\"event\": "), (400,)),
            ("signed invalid UTF-8", raw_request("/webhook/whatsapp", b"{\"event\": \"\xff\xfe\"}"), (400,)),
            ("signed deep nesting", raw_request("/webhook/whatsapp", b"[" * 100000 + b"]" * 100000), (400,)),
            ("signed JSON array", raw_request("/webhook/whatsapp", b"[1,2,3]"), (400,)),
            ("unknown path", raw_request("/webhook/../../etc/passwd", ok_body), (404,)),
            ("GET on the webhook", b"GET /webhook/whatsapp HTTP/1.1\r\nHost: x\r\n\r\n", (404, 405)),
        ]
        results = {}
        for name, data, expected in cases:
            status, raw, _ = raw_exchange(h.url, data)
            results[name] = status
            assert status in expected, "%s: got %s %r" % (name, status, raw[:200])
            assert raw, name
            if status is None:
                assert raw.startswith(b"{\"error\": \"") and (b"request" in raw or b"version" in raw), name
            assert b"Traceback" not in raw and b"File \"" not in raw, name
        # lying Content-Length: fewer bytes than announced, then the client half-closes
        body = body_of(wa_message(KLARA, "AB2", "short"))
        status, raw, took = raw_exchange(h.url, raw_request("/webhook/whatsapp", body[:20],
                                                       headers={"Content-Length": str(len(body)),
                                                                "X-Webhook-Hmac": sign(body)}), shut=True)
        assert status == 400 and took < 5
        assert h.app.store.query("SELECT COUNT(*) FROM queue")[0][0] == 0
        # a body far over the limit is refused from its headers alone (1 GB announced, nothing sent)
        status, raw, took = raw_exchange(h.url, raw_request("/webhook/whatsapp", headers={"Content-Length": str(1 << 30)}),
                                    timeout=5)
        assert status == 413 and took < 5, (status, took)      # answered without reading the 1 GB
        # the server is fine and answers properly afterwards
        assert h.webhook(wa_message(KLARA, "AB3", "after abuse"))[0] == 200
        assert eventually(lambda: len(h.texts()) == 1)
        metrics = http_get(h.url, "/metrics")[1]
        assert 'status="500"' not in metrics
        assert not [r for r in h.logs.records() if "internal error" in r["msg"]]

    def test_idle_and_slow_connections_do_not_block_webhooks(self, bridge, capfd):
        h = bridge
        u = urllib.parse.urlsplit(h.url)
        idle, slow_stop = [], threading.Event()
        try:
            for _ in range(200):
                idle.append(socket.create_connection((u.hostname, u.port), timeout=5))
            for s in idle[:50]:                   # some of them half-way through a request
                s.sendall(b"POST /webhook/whatsapp HTTP/1.1\r\nContent-Length: 100\r\n")
            slow_body = body_of(wa_message(LUKAS, "SLOW1", "slowly"))
            slow_data = raw_request("/webhook/whatsapp", slow_body)

            def slow_sender():
                s = socket.create_connection((u.hostname, u.port), timeout=10)
                try:
                    for b in slow_data:
                        if slow_stop.wait(0.01):
                            return
                        s.sendall(bytes([b]))
                    s.recv(1024)
                except OSError:
                    pass
                finally:
                    s.close()
            slow = threading.Thread(target=slow_sender)
            slow.start()
            time.sleep(0.2)
            latencies = []
            for k in range(5):
                started = time.monotonic()
                status, body = h.webhook(wa_message(KLARA, "PIN%d" % k, "while pinned %d" % k))
                latencies.append(time.monotonic() - started)
                assert status == 200
            assert max(latencies) < 5.0, latencies                 # not blocked by the slow client
            assert eventually(lambda: len(h.texts()) >= 5)
            assert http_get(h.url, "/healthz")[0] == 200
        finally:
            slow_stop.set()
            for s in idle:
                s.close()
        slow.join(5)
        # clients that hang up mid-request are not server errors: no ERROR log, no stderr traceback
        assert eventually(lambda: h.app.server.busy_count() == 0, 10)    # every handler is done: all logged
        errors = [r for r in h.logs.records() if r["level"] == "ERROR"]
        assert not errors, errors[:3]
        assert "Traceback" not in capfd.readouterr().err

    def test_hundred_requests_on_one_kept_alive_connection(self, bridge):
        h = bridge
        u = urllib.parse.urlsplit(h.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        try:
            statuses, socks = collections.Counter(), set()
            for k in range(100):
                if k % 4 == 3:
                    conn.request("GET", "/healthz")
                else:
                    body = body_of(wa_message((KLARA, LUKAS)[k % 2], "KA%d" % k, "keep-alive %d" % k))
                    conn.request("POST", "/webhook/whatsapp", body=body,
                                 headers={"Content-Type": "application/json", "X-Webhook-Hmac": sign(body),
                                          "X-Webhook-Hmac-Algorithm": "sha512"})
                resp = conn.getresponse()
                resp.read()
                statuses[resp.status] += 1
                socks.add(id(conn.sock))
                assert not resp.will_close
        finally:
            conn.close()
        assert statuses == {200: 100} and len(socks) == 1
        assert eventually(lambda: len(h.texts()) == 75, 10)

    def test_stop_does_not_wait_for_idle_keep_alive_connections(self, bridge):
        """SIGTERM: stop accepting, finish in-flight work, close idle keep-alives - not wait them out."""
        h = bridge
        poster = WebhookPoster(h.url)
        try:
            assert poster.post(wa_message(KLARA, "IDLE1", "then idle"))[0] == 200
            started = time.monotonic()
            h.app.stop()
            took = time.monotonic() - started
            h.app = None
        finally:
            poster.close()
        assert took < 5.0, "stop took %.1f s with one idle kept-alive connection open" % took


class TestKernelTimeouts:
    """On Linux a connection's limits are the kernel's (one call per read or write, no poll before it)."""

    @pytest.mark.skipif(not ws.KERNEL_TIMEOUTS, reason="Linux only; elsewhere Python's socket timeouts are kept")
    def test_a_silent_or_unread_peer_is_a_timeout_never_a_blocking_error(self):
        a, b = socket.socketpair()
        try:
            assert ws.kernel_timeouts(a, 0.2) and a.gettimeout() is None
            reader = ws._DeadlineReader(a, 0.2, kernel=True)
            started = time.monotonic()
            with pytest.raises(socket.timeout):
                reader.readinto(bytearray(10))                  # the peer says nothing
            assert time.monotonic() - started < 5
            b.sendall(b"hi")
            assert reader.readinto(bytearray(10)) == 2          # the limit does not outlive the data
            reader.deadline = time.monotonic() + 0.1            # a request deadline shorter than the idle limit
            with pytest.raises(socket.timeout):
                reader.readinto(bytearray(10))
            writer = ws._SocketWriter(a)
            with pytest.raises(socket.timeout):
                for _ in range(10000):                           # the peer reads nothing: the buffers fill up
                    writer.write(b"x" * 65536)
        finally:
            a.close()
            b.close()


class TestHeaderParsing:
    """The server's own header reader gives the same headers as the standard library's, odd blocks included."""

    def test_header_blocks_read_like_http_client(self):
        blocks = [b"Host: a\r\nX-A:  b \t\r\nx-a: second\r\n", b"Host: a\r\n folded\r\n\tagain\r\n",
                  b"Bad Header: x\r\nHost: y\r\n", b"X: a\rb\r\n", b":x\r\nHost: y\r\n", b"From foo\r\nA: b\r\n",
                  b"A:\r\n", b"A: \xff\xfe\r\n", b"A: b\nB: c\n", b"A\t: x\r\n", b"NoColonHere\r\nA: b\r\n"]
        for block in blocks:
            mine = ws.parse_header_block(io.BytesIO(block).readlines())
            std = http.client.parse_headers(io.BytesIO(block + b"\r\n"))
            assert mine.items() == std.items(), block
            assert mine.get("host") == std.get("host") and mine.get_all("x-a") == std.get_all("x-a"), block
            for name in ("HOST", "x-A", "a", "b", "nocolonhere", "missing"):     # any case, first value, default
                assert mine.get(name) == std.get(name) and mine.get(name, "-") == std.get(name, "-"), (block, name)
            mine["Late"], std["Late"] = "added", "added"                       # changed after parsing
            del mine["host"], std["host"]
            assert mine.get("late") == "added" and mine.get("host") == std.get("host") is None, block

    def test_connection_and_expect_headers_are_honoured(self, bridge):
        h = bridge
        body = body_of(wa_message(KLARA, "HP1", "expect"))
        u = urllib.parse.urlsplit(h.url)
        s = socket.create_connection((u.hostname, u.port), timeout=5)
        try:      # Expect: 100-continue gets its interim answer before the body is sent
            s.sendall(raw_request("/webhook/whatsapp", headers={"Expect": "100-continue",
                                                                 "Content-Length": str(len(body)),
                                                                 "X-Webhook-Hmac": sign(body)}))
            assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")
            s.sendall(body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        finally:
            s.close()
        status, raw, _ = raw_exchange(h.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and b"\r\nConnection: close\r\n" in raw
        status, raw, _ = raw_exchange(h.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n")
        assert status == 200
        assert eventually(lambda: len(h.texts()) == 1)



# ===========================================================================
# Issue 7: no secret, text or number in anything the bridge shows
# ===========================================================================

class TestSecrets:

    def test_no_secret_text_or_full_number_anywhere(self, tmp_path, capsys):
        texts = ["the secret plan at nine", "my confidential answer", "whispered reply during an outage"]
        stranger = "+4915999999988"
        h = Harness(tmp_path).start()
        shown = {}
        try:
            cfg = write_config(tmp_path, h.raw)
            # a full round trip
            assert h.webhook(wa_message(KLARA, "SEC1", texts[0], push="Alice"))[0] == 200
            assert eventually(lambda: len(h.texts()) == 1)
            copy_ts = h.signal.requests("send")[0]["timestamp"]
            now = int(time.time() * 1000)
            h.signal.push(owner_env(now, texts[1], quote=bridge_quote(copy_ts, "q")))
            assert h.waha.wait_for(lambda f: len(f.sent("text")) == 1)
            # a stranger, and an owner message that fails once (WAHA answers 500 with the request echoed)
            h.signal.push({"envelope": {"source": stranger, "sourceNumber": stranger, "timestamp": now + 1,
                                        "dataMessage": {"timestamp": now + 1, "message": texts[2]}},
                           "account": BRIDGE})
            h.waha.mode = "error"
            h.signal.push(owner_env(now + 2, texts[2]))
            assert eventually(lambda: any(r["msg"] == "delivery failed, will retry" for r in h.logs.records()), 5)
            h.waha.mode = "ok"
            # abuse: every error answer is kept
            bodies = []
            good = body_of(wa_message(KLARA, "SEC2", texts[0]))
            bad_shape = body_of({"event": "message", "session": "default",
                                  "payload": {"id": "+4915111111189 " + texts[0], "from": 4915111111189,
                                              "body": {"text": texts[0]}, "fromMe": "no"}})
            for data in (raw_request("/webhook/whatsapp", good, signed=False),
                         raw_request("/webhook/whatsapp", good, headers={"X-Webhook-Hmac": sign(good, "x" * 40)}),
                         raw_request("/webhook/whatsapp", b"{\"secret\": \"" + texts[0].encode()),
                         raw_request("/webhook/whatsapp", bad_shape),
                         raw_request("/webhook/whatsapp", good, headers={"Content-Type": "text/plain"}),
                         raw_request("/webhook/whatsapp", good, headers={"Content-Length": str(1 << 30)}),
                         raw_request("/webhook/whatsapp/" + texts[0].replace(" ", "%20"), good, method="PUT"),
                         raw_request("/4915111111189", good),
                         raw_request("/metrics?token=" + WEBHOOK_SECRET, method="GET")):
                status, raw, _ = raw_exchange(h.url, data)
                assert status != 500
                bodies.append(raw.decode("utf-8", "replace"))
            for _ in range(22):                 # until the client is throttled
                status, raw, _ = raw_exchange(h.url, raw_request("/webhook/whatsapp", good, signed=False))
            assert status == 429
            bodies.append(raw.decode("utf-8", "replace"))
            shown["error responses"] = "\n".join(bodies)
            assert h.waha.wait_for(lambda f: len(f.sent("text")) == 2, 10)
            shown["/health"] = http_get(h.url, "/health")[1]
            shown["/metrics"] = http_get(h.url, "/metrics")[1]
            rc, out, err = run_main(capsys, ["--config", cfg, "check-config"], bridge_env())
            assert rc == 0
            shown["check-config"] = out + err
            broken = dict(h.raw, whatsapp=dict(h.raw["whatsapp"], webhookSecret=texts[0]),
                          signal=dict(h.raw["signal"], destination="+49151111111890000"))
            rc, out, err = run_main(capsys, ["--config", write_config(tmp_path, broken, "broken.json"),
                                             "check-config"], bridge_env(secret="short"))
            assert rc == 2 and "webhookSecret" in err
            # (the fix-it hints use +15550000001/2 as examples, which happen to be the test numbers)
            shown["check-config (broken)"] = re.sub(r"write it like \+1555000000[12]", "", out + err)
            rc, out, err = run_main(capsys, ["--config", cfg, "stats"], bridge_env())
            assert rc == 0
            shown["stats"] = out + err
            rc, out, err = run_main(capsys, ["--config", cfg, "outbox"], bridge_env())
            assert rc == 0
            shown["outbox"] = out + err
        finally:
            h.stop()
        shown["logs (debug)"] = h.logs.text()
        assert any(r["msg"] == "unauthorized sender ignored" for r in h.logs.records())
        forbidden = [WEBHOOK_SECRET, ENC_SECRET, WAHA_KEY, "secret plan", "confidential", "whispered",
                     "4915111111189", "4915999999988", "15550000002", "15550000001", "491511111118900"]
        leaks = [(where, f) for where, text in shown.items() for f in forbidden if f in text]
        assert not leaks, leaks


# ===========================================================================
# Issue 13: what an adversarial review found (the server, dedupe, replays)
# ===========================================================================

NINE_MB = 9 * 1024 * 1024


def rss_mb(pid):
    """Resident set size of process *pid* in MB, from /proc."""
    with open("/proc/%d/status" % pid, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS for %d" % pid)


class HostileFlood:
    """*n* hostile connections announcing 9 MB webhook bodies, unsigned or with a forged signature.

    One thread drives every socket without blocking: headers, then as much of
    the body as the socket takes up to the last byte, then one byte per second.
    A connection the server closes is opened again (at most every 0.2 s), so
    the pressure stays at *n* connections until ``stop``.
    """

    def __init__(self, url, n):
        u = urllib.parse.urlsplit(url)
        self.addr, self.n = (u.hostname, u.port), n
        self.stop_event = threading.Event()
        self.opened = self.closed_by_server = 0
        self.answers = collections.Counter()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _open(self, k):
        s = socket.create_connection(self.addr, timeout=2)
        s.setblocking(False)
        head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(NINE_MB)}
        if k % 2:
            head["X-Webhook-Hmac"] = "%0128x" % (k + 1)      # the right shape, the wrong value
            head["X-Webhook-Hmac-Algorithm"] = "sha512"
        data = ("POST /webhook/whatsapp HTTP/1.1\r\n" + "".join("%s: %s\r\n" % kv for kv in head.items())
                + "\r\n").encode()
        self.opened += 1
        return {"sock": s, "k": k, "pending": data, "sent": 0, "next": 0.0, "reopen": 0.0}

    def _pump(self, c, now, chunk):
        s = c["sock"]
        try:
            got = s.recv(4096)
            if got:
                m = re.match(rb"HTTP/1\.[01] (\d{3})", got)
                self.answers[int(m.group(1)) if m else None] += 1
            else:
                raise ConnectionResetError
        except BlockingIOError:
            pass
        if c["pending"]:
            n = s.send(c["pending"])
            c["pending"] = c["pending"][n:]
            return
        if c["sent"] < NINE_MB - 1:
            c["sent"] += s.send(chunk[:NINE_MB - 1 - c["sent"]])
        elif now >= c["next"]:
            c["next"] = now + 1.0                    # the last byte never comes: one byte a second instead
            s.send(b" ")

    def run(self):
        chunk = b" " * 262144
        conns = [None] * self.n
        while not self.stop_event.is_set():
            now = time.monotonic()
            for k in range(self.n):
                c = conns[k]
                if c is None or c["sock"] is None:
                    if c is not None and now < c["reopen"]:
                        continue
                    try:
                        conns[k] = c = self._open(k)
                    except OSError:
                        conns[k] = {"sock": None, "reopen": now + 0.2}
                        continue
                try:
                    self._pump(c, now, chunk)
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_by_server += 1
                    c["sock"].close()
                    c["sock"], c["reopen"] = None, now + 0.2
            self.stop_event.wait(0.01)
        for c in conns:
            if c is not None and c["sock"] is not None:
                c["sock"].close()

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def dribble(url, data, first=b"", every=0.1, limit=8.0):
    """Send *first* at once, then *data* a byte every *every* s.

    Return (seconds until the server cut the connection off, or None when it
    never did within *limit*; what the server answered).
    """
    u = urllib.parse.urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=2)
    started = time.monotonic()
    answer = b""
    try:
        s.sendall(first)
        s.settimeout(every)
        for i in range(len(data)):
            if time.monotonic() - started > limit:
                return None, answer
            try:
                s.send(data[i:i + 1])
                got = s.recv(4096)
                if not got:
                    return time.monotonic() - started, answer
                answer += got
            except socket.timeout:
                continue
            except OSError:
                return time.monotonic() - started, answer
        return None, answer
    finally:
        s.close()


class TestServerLimits:
    """Connections, handler threads and unverified bodies are bounded; signed webhooks still get through."""

    def test_flood_of_hostile_connections_keeps_memory_bounded_and_webhooks_answered(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        bridge = BridgeProcess.against(tmp_path, upstream_fakes)
        flood = None
        try:
            bridge.start()
            poster = WebhookPoster(bridge.url, timeout=5)
            assert poster.post(wa_message(KLARA, "FL0", "before the flood"))[0] == 200
            base = rss_mb(bridge.proc.pid)
            flood = HostileFlood(bridge.url, 200).start()
            peak, answered, k = base, [], 0

            def seen_enough():      # every kind of refusal met, and a run of signed webhooks answered meanwhile
                return (len(answered) >= 10 and flood.answers[503] > 0 and flood.answers[401] + flood.answers[429] > 0
                        and flood.opened > 200 and flood.closed_by_server > 0)
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline and not seen_enough():
                peak = max(peak, rss_mb(bridge.proc.pid))
                if peak >= 60:
                    break                                 # no point in pushing a machine further
                k += 1
                status, _, took = poster.post(wa_message(LUKAS, "FL%d" % k, "during the flood %d" % k))
                answered.append((status, round(took, 2)))
                time.sleep(0.2)
            peak = max(peak, rss_mb(bridge.proc.pid))
            flood.stop()
            assert peak < 60, "RSS went from %.0f MB to %.0f MB under 200 hostile connections" % (base, peak)
            assert len(answered) >= 10 and all(st == 200 and took < 5.0 for st, took in answered), answered
            assert flood.opened > 200 and flood.closed_by_server > 0, (flood.opened, flood.closed_by_server)
            assert set(flood.answers) <= {401, 503, 429, 408, None}, flood.answers
            assert flood.answers[503] > 0, flood.answers            # forged signatures: over the body budget
            assert flood.answers[401] + flood.answers[429] > 0, flood.answers   # unsigned: before the body
            assert daemon.wait_for(lambda f: len(f.sent()) == 1 + len(answered), 15)
            metrics = http_get(bridge.url, "/metrics")[1]
            assert 'status="500"' not in metrics
            assert not [r for r in bridge.log_records() if r.get("level") == "ERROR"]
        finally:
            if flood is not None:
                flood.stop_event.set()
                flood.thread.join(10)
            bridge.stop()

    def test_connections_over_the_cap_get_503_at_once(self, tmp_path, upstream_fakes):
        bridge = BridgeProcess.against(tmp_path, upstream_fakes, maxConnections=4, requestTimeoutSeconds=30)
        held = []
        try:
            bridge.start()
            u = urllib.parse.urlsplit(bridge.url)
            for _ in range(4):
                s = socket.create_connection((u.hostname, u.port), timeout=5)
                s.sendall(b"POST /webhook/whatsapp HTTP/1.1\r\n")       # a request that never ends
                held.append(s)
            # a fifth connection is answered before it sends anything (and no thread is started for it)
            status, raw, took = raw_exchange(bridge.url, b"")
            assert status == 503 and b"too many connections" in raw and took < 5.0, raw
            held.pop().close()
            assert eventually(lambda: raw_exchange(bridge.url, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200, 5)
            # (a connection just closed frees its place once its thread has seen the close: hence the wait)
            assert eventually(lambda: 'reason="connections"' in http_get(bridge.url, "/metrics")[1], 5)
        finally:
            for s in held:
                s.close()
            bridge.stop()

    def test_the_whole_request_has_a_deadline_not_each_read(self, tmp_path, upstream_fakes):
        bridge = BridgeProcess.against(tmp_path, upstream_fakes, requestTimeoutSeconds=1.0)
        try:
            bridge.start()
            body = body_of(wa_message(KLARA, "DL1", "slowly"))
            # the headers one byte every 0.1 s: each read is quick, the request never ends
            cut, _ = dribble(bridge.url, raw_request("/webhook/whatsapp", body))
            assert cut is not None, "a request dribbled a byte every 0.1 s was never cut off"
            # the headers at once, the body one byte every 0.1 s: answered 408 and closed
            data = raw_request("/webhook/whatsapp", body)
            head, _, rest = data.partition(b"\r\n\r\n")
            cut, answer = dribble(bridge.url, rest, first=head + b"\r\n\r\n")
            assert cut is not None and answer.startswith(b"HTTP/1.1 408"), answer[:80]
            # a kept-alive connection that idles between requests is not cut by the deadline
            poster = WebhookPoster(bridge.url)
            assert poster.post(wa_message(KLARA, "DL2", "first"))[0] == 200
            time.sleep(1.5)
            assert poster.post(wa_message(KLARA, "DL3", "second"))[0] == 200 and poster.connects == 1
            poster.close()
        finally:
            bridge.stop()


class TestMessageIds:

    def test_no_message_id_length_or_form_gives_a_500(self, tmp_path, upstream_fakes):
        """Signed webhooks whose ids (message, reaction target, edit, delete, ack) have every length and form."""
        bridge = BridgeProcess.against(tmp_path, upstream_fakes)
        lengths = (1, 2, 31, 127, 128, 129, 130, 200, 255, 256, 299, 300, 301, 1000)
        forms = {
            "bare": lambda n: "B" * n,
            "underscores": lambda n: ("U_" * n)[:n],
            "unicode": lambda n: "\u00e9" * n,
            "spaces": lambda n: (" x\n" * n)[:n],
            "serialized": lambda n: "false_%s_%s" % (KLARA, "S" * n),
            "serialized in a group": lambda n: "false_120363000000000001@g.us_%s_%s" % ("G" * n, LUKAS),
            "serialized without a chat": lambda n: "true_nochat_%s" % ("N" * n),
        }

        def events(mid, k):
            ser = mid if mid.startswith(("false_", "true_")) else "false_%s_%s" % (KLARA, mid)
            base = {"session": "default", "engine": "GOWS", "me": {"id": "15550000001@c.us"}}
            common = {"from": KLARA, "fromMe": False, "timestamp": 1767225600 + k}
            yield dict(base, event="message", payload=dict(common, id=mid, body="id case %d" % k))
            yield dict(base, event="message", payload=dict(common, id={"_serialized": mid}, body="dict id %d" % k))
            yield dict(base, event="message", payload=dict(common, id="false_%s_R%d" % (KLARA, k),
                                                            body="reply %d" % k, replyTo={"id": mid}))
            yield dict(base, event="message.reaction",
                       payload=dict(common, id="false_%s_RE%d" % (KLARA, k),
                                    reaction={"text": "+", "messageId": ser}))
            yield dict(base, event="message.edited", payload=dict(common, id="E%d" % k, editedMessageId=mid, body="e"))
            yield dict(base, event="message.revoked", payload={"revokedMessageId": mid, "after": common,
                                                               "before": dict(common, id=mid)})
            yield dict(base, event="message.ack", payload=dict(common, id=ser, ack=3))

        try:
            bridge.start()
            poster = WebhookPoster(bridge.url)
            answers, odd, k = collections.Counter(), [], 0
            for form, make in forms.items():
                for n in lengths:
                    for ev in events(make(n), k):
                        k += 1
                        status, data, _ = poster.post(ev)
                        answers[status] += 1
                        if status not in (200, 400):
                            odd.append((form, n, ev["event"], status, data[:80]))
            poster.close()
            assert not odd, odd[:5]
            assert answers[200] > 100 and answers[400] > 20, answers
            db = bridge.raw["database"]["path"]
            assert eventually(lambda: db_query(db, "SELECT COUNT(*) FROM queue WHERE state='pending'")[0][0] == 0, 30)
            assert db_query(db, "SELECT COUNT(*) FROM queue WHERE state='dead'")[0][0] == 0
            assert http_get(bridge.url, "/healthz")[0] == 200
            assert 'status="500"' not in http_get(bridge.url, "/metrics")[1]
            assert not [r for r in bridge.log_records() if r.get("level") == "ERROR"]
        finally:
            bridge.stop()


class TestChannelScopedDedupe:
    """WhatsApp gives a group message the same id for every member: each channel must still get its copy."""

    def shared_group_traffic(self, h, bare, sessions=("default", "work")):
        for session in sessions:
            ev = wa_message(FAMILY, bare, "shared news", participant=DORA, session=session)
            assert h.webhook(ev) == (200, {"status": "stored"}), session

    def test_a_group_message_shared_by_two_channels_reaches_both_owners(self, make_bridge):
        h = make_bridge("daemon", raw_overrides=dict(TWO_CHANNELS))
        bare = "3EB0SHARED00000001"
        self.shared_group_traffic(h, bare)
        copies = lambda: sorted(o["to"] for o in h.received() if (o["text"] or "").endswith("shared news"))
        assert eventually(lambda: copies() == sorted([OWNER, OWNER2])), h.received()
        target = "false_%s_%s_%s" % (FAMILY, bare, DORA)
        mapped = lambda: h.app.store.one("SELECT COUNT(*) FROM messages WHERE direction='w2s'")[0] == 2
        assert eventually(mapped)
        for session in ("default", "work"):       # the same reaction, edit and delete, seen by both accounts
            base = {"from": FAMILY, "fromMe": False, "participant": DORA, "timestamp": int(time.time())}
            for name, payload in (
                    ("message.reaction", dict(base, id="false_%s_R1_%s" % (FAMILY, DORA),
                                              reaction={"text": "\U0001F44D", "messageId": target})),
                    ("message.edited", dict(base, id="false_%s_E1_%s" % (FAMILY, DORA), body="edited news",
                                            editedMessageId=bare)),
                    ("message.revoked", {"revokedMessageId": bare, "before": None,
                                         "after": dict(base, id="false_%s_D1_%s" % (FAMILY, DORA))})):
                assert h.webhook(h.waha.event(name, payload, session=session)) == (200, {"status": "stored"}), \
                    (session, name)
        reacted = lambda: sorted(r["recipient"][0] for r in h.signal.sent("sendReaction"))
        deleted = lambda: sorted(r["recipient"][0] for r in h.signal.sent("remoteDelete"))
        edited = lambda: sorted(o["to"] for o in h.received() if o["edit"])
        both = sorted([OWNER, OWNER2])
        assert eventually(lambda: reacted() == both and edited() == both and deleted() == both), \
            (reacted(), edited(), deleted())
        # and each one only once: WAHA resending any of them is a duplicate within its own channel
        ev = wa_message(FAMILY, bare, "shared news", participant=DORA, session="work")
        assert h.webhook(ev) == (200, {"status": "duplicate"})

    def test_a_database_from_before_keeps_its_dedupe_memory(self, make_bridge):
        """Before, one dedupe index spanned all channels; the upgrade keeps every stored key."""
        h = make_bridge("daemon", raw_overrides=dict(TWO_CHANNELS))
        bare = "3EB0BEFOREUPGRADE1"
        ev = wa_message(FAMILY, bare, "shared news", participant=DORA, session="default")
        assert h.webhook(ev) == (200, {"status": "stored"})
        assert eventually(lambda: len([o for o in h.received() if (o["text"] or "").endswith("shared news")]) == 1)
        h.app.stop()
        h.app = None
        db = sqlite3.connect(h.raw["database"]["path"])           # back to the index of schema 3
        try:
            old_index = [l for l in ws.SCHEMA[0].splitlines() if "queue_dedupe" in l][0].strip()
            before = [v for v, script in enumerate(ws.SCHEMA) if "queue_dedupe_channel" in script][0]
            db.executescript("BEGIN; DROP INDEX queue_dedupe_channel; %s COMMIT;" % old_index)
            assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name='queue_dedupe'").fetchone()[0] == 1
            # the upgrade's own script, as Store.migrate runs it (later versions' scripts are not repeatable)
            db.executescript("BEGIN;" + ws.SCHEMA[before] + "COMMIT;")
            assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'queue_dedupe%'")] \
                == ["queue_dedupe_channel"]
        finally:
            db.close()
        h.start()
        assert h.webhook(ev) == (200, {"status": "duplicate"})         # no second delivery after the upgrade
        ev2 = wa_message(FAMILY, bare, "shared news", participant=DORA, session="work")
        assert h.webhook(ev2) == (200, {"status": "stored"})           # and the other channel now gets its copy
        copies = lambda: sorted(o["to"] for o in h.received() if (o["text"] or "").endswith("shared news"))
        assert eventually(lambda: copies() == sorted([OWNER, OWNER2])), h.received()


class TestReplays:
    """A signed webhook older than the dedupe memory (retentionDays) may have been delivered and forgotten."""

    def test_webhooks_older_than_retention_are_refused_and_counted(self, tmp_path):
        clock = FakeClock(start=T0)
        h = Harness(tmp_path, clock=clock.time, raw_overrides={"retentionDays": 30}).start()

        def at(event, when):
            return fresh(event, when)

        try:
            first = body_of(at(wa_message(KLARA, "RP1", "said once"), T0))
            assert post_signed(h, first)[3] == {"status": "stored"}
            assert eventually(lambda: len(h.texts()) == 1)
            assert eventually(lambda: h.app.store.queue_depth("w2s") == 0)
            clock.advance(31 * DAY)
            assert ws.run_cleanup(h.app)["queue"] == 1          # its dedupe memory is gone
            assert post_signed(h, first)[:4:3] == (200, {"status": "stale"})     # the same signed bytes again
            now = clock.time()
            old = now - 40 * DAY
            replays = [
                at(wa_message(LUKAS, "RP2", "never seen, 40 days old"), old),
                at(h.waha.event("message.reaction", {"id": "false_%s_RP3" % KLARA, "from": KLARA,
                                                     "fromMe": False, "timestamp": 0,
                                                     "reaction": {"text": "+", "messageId": "false_%s_RP1" % KLARA}}),
                   old),
                at(h.waha.event("message.edited", {"id": "false_%s_RP4" % KLARA, "from": KLARA,
                                                   "fromMe": False, "timestamp": 0, "body": "changed",
                                                   "editedMessageId": "RP1"}), old),
                at(h.waha.event("message.revoked", {"revokedMessageId": "RP1", "before": None,
                                                    "after": {"id": "false_%s_RP5" % KLARA, "from": KLARA,
                                                              "fromMe": False, "timestamp": 0}}), old),
            ]
            replays[1]["payload"].pop("timestamp")       # no WhatsApp time: the envelope's (ms) counts
            replays[1]["timestamp"] = int(old * 1000)
            for ev in replays:
                status, _, _, js = post_signed(h, body_of(ev))
                assert (status, js) == (200, {"status": "stale"}), ev["event"]
            # inside the memory (29 days, and a WhatsApp clock a little ahead) everything is taken as usual
            assert post_signed(h, body_of(at(wa_message(LUKAS, "RP6", "29 days late"), now - 29 * DAY)))[3] == \
                {"status": "stored"}
            assert post_signed(h, body_of(at(wa_message(LUKAS, "RP7", "from the future"), now + 60)))[3] == \
                {"status": "stored"}
            assert eventually(lambda: len(h.texts()) == 3), h.texts()
            assert [t for t in h.texts() if "said once" in t] == [h.texts()[0]]
            assert h.app.store.one("SELECT COUNT(*) FROM queue")[0] == 2
            assert metric_value(http_get(h.url, "/metrics")[1], "whatsignal_rejected_total", reason="stale") == 5
            stale_logs = [r for r in h.logs.records() if r["msg"] == "stale webhook ignored: older than retentionDays"]
            assert len(stale_logs) == 5 and all(r["age_days"] >= 30 for r in stale_logs)
        finally:
            h.stop()


class TestOwnerEnvelopeDedupe:
    """The owner's envelopes are deduplicated by (timestamp, device, kind); typing and receipts never."""

    def test_typing_and_messages_in_the_same_millisecond_all_count(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, BOB, "are you there?")
        ts = new_ts()

        def from_device(obj, device):
            obj["envelope"]["sourceDevice"] = device
            return obj
        typing = from_device(signal_fixture("signal-envelope-typing-derived.json", ts=ts), 2)
        stopped = copy.deepcopy(typing)
        stopped["envelope"]["typingMessage"]["action"] = "STOPPED"
        pushed = [typing,                                          # the laptop starts typing ...
                  from_device(envelope(ts, "the real answer"), 1),  # ... in the millisecond the phone sends
                  stopped, copy.deepcopy(typing),                  # typing, same stamp again: never deduplicated
                  from_device(envelope(ts, "from the laptop"), 2),  # another device, same millisecond
                  from_device(envelope(ts, "the real answer"), 1)]  # the very same envelope again: a duplicate
        for obj in pushed:
            assert h.signal.push(obj)
        want = [{"session": "default", "chatId": BOB, "text": t} for t in ("the real answer", "from the laptop")]
        assert eventually(lambda: waha_texts(h) == want and len(h.waha.calls_for("/api/startTyping")) == 2), \
            (waha_texts(h), [c["path"] for c in h.waha.calls if "Typing" in c["path"]])
        settle_s2w(h)                                   # everything pushed before the marker was handled
        assert waha_texts(h, BOB) == want
        assert [c["path"] for c in h.waha.calls if "Typing" in c["path"]] == \
            ["/api/startTyping", "/api/stopTyping", "/api/startTyping"]
        assert len(queue_rows(h, "s2w")) == 5 + 1               # the duplicate is not stored; the marker is

    def test_an_envelope_stored_under_the_old_key_stays_a_duplicate(self, make_bridge):
        h = make_bridge("daemon")
        forward_to_signal(h, BOB, "before the upgrade")
        ts = new_ts()
        obj = envelope(ts, "answered before the upgrade")
        # what the bridge stored before keys named the device and kind: (owner, timestamp)
        record = {"kind": "message", "ts": ts, "fields": {"text": "answered before the upgrade", "quote": None,
                                                          "attachments": [], "group": None}, "received_at": 0}
        assert h.app.store.enqueue("default", "s2w", "%s:%d" % (OWNER, ts), "~owner", "message", record, time.time())
        assert h.app.bridge.ingest_envelope(obj) == "duplicate"
        assert h.signal.push(copy.deepcopy(obj))
        settle_s2w(h)
        assert len(queue_rows(h, "s2w")) == 2                   # the old row and the marker: nothing stored twice
        assert len([b for b in waha_texts(h) if b["text"] == "answered before the upgrade"]) <= 1


class TestHealthDetails:
    """/health and /readyz keep their shape for everyone; where an upstream lives is for the token holder."""

    def test_upstream_addresses_only_for_the_metrics_token(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        token = "metrics-token-" + "m" * 20
        bridge = BridgeProcess.against(tmp_path, upstream_fakes, metricsToken=token)
        try:
            bridge.start()
            waha.mode = "down"                       # WAHA drops every connection
            where = urllib.parse.urlsplit(waha.url)
            for path in ("/health", "/readyz"):
                status, text = http_get(bridge.url, path)
                rep = json.loads(text)
                assert {"status", "timestamp", "version"} <= set(rep) and rep["status"] == "degraded", rep
                check = rep["checks"]["whatsapp"]
                assert check["status"] == "error" and check["error"], rep
                assert where.hostname not in text and str(where.port) not in text, text
                assert "127.0.0.1" not in text and daemon.url not in text, text
                status, text = http_get(bridge.url, path, headers={"Authorization": "Bearer " + token})
                rep = json.loads(text)
                assert "%s:%d" % (where.hostname, where.port) in rep["checks"]["whatsapp"]["error"], rep
                status, text = http_get(bridge.url, path, headers={"Authorization": "Bearer wrong"})
                assert str(where.port) not in text
        finally:
            bridge.stop()

    def test_the_owner_reads_where_waha_fails_in_status(self, make_bridge):
        h = make_bridge("daemon")
        where = urllib.parse.urlsplit(h.waha.url)
        h.waha.mode = "down"
        owner_push(h, "/status")
        status = lambda: [o["text"] for o in h.received() if o["to"] == OWNER and o["text"].startswith("WhatSignal")]
        assert eventually(status), h.received()
        assert [l for l in status()[0].splitlines() if l.startswith("WAHA: ")
                and "%s:%d" % (where.hostname, where.port) in l], status()[0]
        assert "WAHA: " not in http_get(h.url, "/health")[1]

    def test_concurrent_requests_share_one_upstream_check(self, tmp_path, upstream_fakes):
        waha, daemon = upstream_fakes
        bridge = BridgeProcess.against(tmp_path, upstream_fakes)
        try:
            bridge.start()
            waha.slow_seconds, waha.mode = 0.6, "slow"
            pings = lambda: len(waha.calls_for("/ping"))
            before = pings()
            results = []
            threads = [threading.Thread(target=lambda: results.append(http_get(bridge.url, "/health")[0]))
                       for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            assert not any(t.is_alive() for t in threads)
            assert results == [200] * 12
            assert pings() - before == 1, "%d WAHA pings for 12 concurrent /health requests" % (pings() - before)
        finally:
            waha.mode = "ok"
            bridge.stop()


class TestSecureDelete:

    def test_what_retention_removes_does_not_linger_in_free_pages(self, tmp_path):
        raw = offline_raw(tmp_path, retentionDays=30)
        path = raw["database"]["path"]
        store = open_store(path)
        try:
            old, now = time.time() - 40 * DAY, time.time()
            for n in range(50):                     # old and recent rows side by side in the same pages
                for when, name in ((old, "gone"), (now, "kept")):
                    store.enqueue("default", "w2s", "%s%d" % (name, n), KLARA, "message", {"body": "x" * 300}, when)
                    store.finish(last_queue_id(store), "done", when)
            sealed = [bytes(r[0]) for r in store.query("SELECT body FROM queue WHERE created_at < ?", (now - 1,))]
            assert ws.cleanup(store, make_config(raw), now)["queue"] == 50
        finally:
            store.close()
        with open(path, "rb") as f:
            data = f.read()
        lingering = [b for b in sealed if b[40:104] in data]
        assert not lingering, "%d of %d deleted values still readable in the file" % (len(lingering), len(sealed))
        store = open_store(path)            # set by the bridge itself, whatever the SQLite build's default
        try:
            assert store.one("PRAGMA secure_delete")[0] == 1
        finally:
            store.close()


# ===========================================================================
# Sealed values bound to their place; rotate-key covers every column
# ===========================================================================

SHARED_GROUP = "120363099999999999@g.us"
CAROL_NAME = "Carol Quartermaine"


def rotate_key_via_cli(capsys, h, tmp_path):
    """Stop the bridge (if running), rotate-key through the command line; start() then uses the new secret."""
    if h.app:
        h.app.stop()
        h.app = None
    cfg = write_config(tmp_path, h.raw, "rotate.json")
    rc, out, err = run_main(capsys, ["--config", cfg, "rotate-key"],
                            bridge_env(NEW_SECRET, WHATSIGNAL_ENCRYPTION_SECRET_OLD=ENC_SECRET))
    assert rc == 0, err
    h.environ = {"WHATSIGNAL_ENCRYPTION_SECRET": NEW_SECRET}
    return json.loads(out)


def schema_columns(db_path):
    """{table: [column, ...]} of a database, read from SQLite itself."""
    tables = [r[0] for r in db_query(db_path, "SELECT name FROM sqlite_master WHERE type='table'"
                                             " AND name NOT LIKE 'sqlite_%'")]
    return {t: [r[1] for r in db_query(db_path, 'PRAGMA table_info("%s")' % t)] for t in tables}


class TestSealedPlaces:
    """A sealed value opens only in the table, column and row it was written for."""

    def test_swapped_chat_ids_between_rows_are_rejected(self, tmp_path):
        h = Harness(tmp_path).start()
        try:
            assert h.webhook(wa_message(KLARA, "SWA1", "alice asks", push="Alice"))[0] == 200
            assert h.webhook(wa_message(LUKAS, "SWB1", "bob asks", push="Bob"))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 2)
            copies = {r["message"]: r["timestamp"] for r in h.signal.requests("send")}
            h.app.stop()
            h.app = None
            db = h.raw["database"]["path"]
            rows = db_query(db, "SELECT id, wa_chat_enc FROM messages ORDER BY id")
            assert len(rows) == 2
            (a, a_enc), (b, b_enc) = rows
            db_query(db, "UPDATE messages SET wa_chat_enc=? WHERE id=?", (b_enc, a))
            db_query(db, "UPDATE messages SET wa_chat_enc=? WHERE id=?", (a_enc, b))
            h.start()
            # the owner answers Alice: the swapped chat id must not send it to Bob
            h.signal.push(owner_env(int(time.time() * 1000), "for alice only", quote=bridge_quote(copies["~Alice (+4915111111189): alice asks"], "q")))
            assert eventually(lambda: h.app.store.one("SELECT COUNT(*) FROM queue WHERE direction='s2w' AND state='dead'")[0] == 1)
            assert h.waha.sent("text") == []
            assert eventually(lambda: any("Not delivered to WhatsApp" in (t or "") for t in h.texts()))
        finally:
            h.stop()

    def test_a_contact_name_is_not_accepted_as_a_chat_id(self, tmp_path):
        h = Harness(tmp_path).start()
        try:
            h.waha.contacts[KLARA] = "4915999999999@c.us"   # a name an attacker could pick
            assert h.webhook(wa_message(KLARA, "CNA1", "alice asks"))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 1)
            ts = h.signal.requests("send")[0]["timestamp"]
            h.app.stop()
            h.app = None
            db = h.raw["database"]["path"]
            (name_enc,), = db_query(db, "SELECT name_enc FROM contacts")
            db_query(db, "UPDATE messages SET wa_chat_enc=?", (name_enc,))
            h.start()
            h.signal.push(owner_env(int(time.time() * 1000), "for alice only", quote=bridge_quote(ts, "q")))
            assert eventually(lambda: h.app.store.one("SELECT COUNT(*) FROM queue WHERE direction='s2w' AND state='dead'")[0] == 1)
            assert h.waha.sent("text") == []
        finally:
            h.stop()

    def test_a_queued_body_moved_to_another_row_is_not_delivered(self, tmp_path):
        h = Harness(tmp_path)
        h.raw["signal"]["rpcUrl"] = DEAD_URL      # nothing is delivered while the bodies are moved
        h.start()
        try:
            assert h.webhook(wa_message(KLARA, "QB1", "first"))[0] == 200
            assert h.webhook(wa_message(LUKAS, "QB2", "second"))[0] == 200
            h.app.stop()
            h.app = None
            db = h.raw["database"]["path"]
            (first,), = db_query(db, "SELECT body FROM queue WHERE id=1")
            db_query(db, "UPDATE queue SET body=? WHERE id=2", (first,))
            store = open_store(db)
            try:
                assert store.record_of(store.one("SELECT * FROM queue WHERE id=1"))["body"] == "first"
                with pytest.raises(ws.CryptoError):
                    store.record_of(store.one("SELECT * FROM queue WHERE id=2"))
            finally:
                store.close()
        finally:
            h.stop()

    def test_upgrade_binds_values_written_before_schema_5(self, tmp_path):
        """A schema 3 database (values sealed without associated data) is re-sealed on first start, resumably."""
        db = str(tmp_path / "old.db")
        salt = os.urandom(16)
        old = ws.Cipher(ENC_SECRET, salt, n=2 ** 15, r=8, p=1)   # the derivation releases before schema 5 used

        def v1(value):   # Cipher version 1: HMAC over version, nonce and ciphertext only
            nonce = os.urandom(16)
            head = b"\x01" + nonce
            ct = old._xor(value.encode(), nonce)
            return head + ct + hmac.new(old.mac_key, head + ct, hashlib.sha256).digest()
        conn = sqlite3.connect(db, isolation_level=None)
        for v in range(3):
            conn.executescript("BEGIN;" + ws.SCHEMA[v] + "PRAGMA user_version=%d; COMMIT;" % (v + 1))
        conn.execute("INSERT INTO meta VALUES ('salt', ?), ('key_check', ?)", (salt.hex(), old.key_check()))
        for n in range(5):
            rec = json.dumps({"body": "queued %d" % n, "_dedupe": "m:Q%d" % n, "_chat": KLARA})
            conn.execute("INSERT INTO queue(channel, direction, dedupe, chat, kind, body, next_at, created_at, updated_at)"
                         " VALUES ('default', 'w2s', ?, ?, 'message', ?, 0, 0, 0)",
                         (old.token("dedupe", "m:Q%d" % n), old.token("chat", KLARA), v1(rec)))
        conn.execute("INSERT INTO messages(channel, direction, wa_chat, wa_chat_enc, wa_msg, wa_msg_enc, sig_ts,"
                     " sig_author_enc, wa_sender, created_at) VALUES ('default', 'w2s', ?, ?, ?, ?, 77, ?, ?, 0)",
                     (old.token("chat", SHARED_GROUP), v1(SHARED_GROUP), old.token("msg", "M1"),
                      v1("false_%s_M1_%s" % (SHARED_GROUP, MARTA)), v1(BRIDGE), old.token("jid", MARTA)))
        original = json.dumps({"body": "group original", "sender": MARTA, "_dedupe": "m:M1", "_chat": SHARED_GROUP})
        conn.execute("INSERT INTO queue(channel, direction, dedupe, chat, kind, body, state, next_at, created_at,"
                     " updated_at) VALUES ('default', 'w2s', ?, ?, 'message', ?, 'done', 0, 0, 0)",
                     (old.token("dedupe", "m:M1"), old.token("chat", SHARED_GROUP), v1(original)))
        conn.execute("INSERT INTO state VALUES ('default', 's2w-progress:5', '1|true_%s_X' , 0)" % LUKAS)
        conn.close()
        store = ws.Store(db)     # the schema upgrade itself needs no key: the re-sealing waits for unlock
        store.close()
        assert db_query(db, "PRAGMA user_version")[0][0] == ws.SCHEMA_VERSION
        assert db_query(db, "SELECT value FROM meta WHERE key='reseal'") == [("pending",)]
        # as left by an upgrade interrupted half-way: the first two queue rows are re-sealed already
        for rid, dedupe, body in db_query(db, "SELECT id, dedupe, body FROM queue WHERE id <= 2"):
            bound = old.encrypt(old.decrypt_legacy(body, b""), ws.seal_context("queue", "body", "default", "w2s", dedupe))
            db_query(db, "UPDATE queue SET body=? WHERE id=?", (bound, rid))
        store = open_store(db)    # goes on where it stopped
        try:
            assert store.meta("reseal") is None
            assert [store.record_of(r)["body"] for r in store.query("SELECT * FROM queue ORDER BY id")] == \
                ["queued %d" % n for n in range(5)] + ["group original"]
            assert store.by_sig("default", 77)["chat"] == SHARED_GROUP
            # the author, kept only as a token before, is sealed beside it (found in its queued original), so
            # a later rotate-key can recompute the token
            mapping = store.one("SELECT * FROM messages")
            assert store.open_row(mapping, "messages", "wa_sender_enc") == MARTA
            assert store.state("default", "s2w-progress:5", sealed=True) == "1|true_%s_X" % LUKAS
            assert db_query(db, "SELECT value FROM state") == [(None,)]
            for table, (_, cols) in ws.SEALED.items():
                for row in store.query("SELECT * FROM %s" % table):
                    for c in cols:
                        assert row[c] is None or row[c][0] == ws.Cipher.VERSION
        finally:
            store.close()
        assert LUKAS[:13].encode() not in open(db, "rb").read()


    def test_the_upgrade_waits_until_the_older_release_has_stopped(self, tmp_path):
        db = str(tmp_path / "w.db")
        open_store(db).close()
        db_query(db, "INSERT OR REPLACE INTO meta VALUES ('reseal', 'pending')")   # as right after the upgrade
        db_query(db, "INSERT INTO lease(name, holder, expires_at) VALUES ('serving:oldhost:7:x', 'oldhost:7:x', ?)",
                (time.time() + 60,))
        with pytest.raises(ws.CryptoError, match="older WhatSignal is still running.*stop it first"):
            open_store(db)
        db_query(db, "DELETE FROM lease")
        store = open_store(db)
        try:
            assert store.meta("reseal") is None
        finally:
            store.close()


class TestRotationCoverage:
    """rotate-key recomputes every token and re-seals every sealed column the schema has."""

    def test_every_column_of_the_schema_is_classified(self, tmp_path):
        store = open_store(tmp_path / "schema.db")
        store.close()
        schema = schema_columns(str(tmp_path / "schema.db"))
        for table, columns in schema.items():
            sealed = set(ws.SEALED.get(table, ((), ()))[1])
            tokens = set(ws.TOKENS.get(table, {}))
            plain = set(ws.PLAIN.get(table, ()))
            assert not (sealed & tokens or sealed & plain or tokens & plain), table
            assert sealed | tokens | plain == set(columns), \
                "%s: classify every column as sealed, token or plain (unclassified: %s)" % (
                    table, sorted(set(columns) - sealed - tokens - plain))
            assert all(c.endswith("_enc") or c == "body" for c in sealed)
            assert not any(c.endswith("_enc") for c in tokens | plain)
            for key in ws.SEALED.get(table, ((), ()))[0]:
                assert key in columns
            for column, (domain, source) in ws.TOKENS.get(table, {}).items():
                if source is None:
                    assert table in ws.ROTATION_DROPS, "%s.%s has no sealed source: rotate-key must drop it" % (
                        table, column)
                else:
                    assert source.partition(".")[0] in sealed
        assert set(ws.SEALED) | set(ws.TOKENS) | set(ws.PLAIN) == set(schema)

    def test_after_rotation_no_column_holds_a_token_of_the_old_key(self, tmp_path, capsys):
        h = Harness(tmp_path, raw_overrides={"bridge": {"layout": "groups"}})
        h.start()
        try:
            h.waha.contacts[MARTA] = CAROL_NAME
            h.waha.lids["123456789012345@lid"] = MARTA
            assert h.webhook(wa_message(SHARED_GROUP, "GM1", "group hello", participant=MARTA))[0] == 200
            lid_sender = "123456789012345@lid"
            assert h.webhook(wa_message(SHARED_GROUP, "GM2", "hello from a lid", participant=lid_sender))[0] == 200
            assert h.webhook(wa_message(KLARA, "DM1", "direct hello"))[0] == 200
            assert h.webhook(wa_reaction(KLARA, "DM1", "👍", "R1"))[0] == 200
            assert eventually(lambda: h.app.store.one("SELECT COUNT(*) FROM queue WHERE state='pending'")[0] == 0)
            db = h.raw["database"]["path"]
            h.app.stop()
            h.app = None
            schema = schema_columns(db)
            hexes = re.compile(rb"[0-9a-f]{32}")

            def tokens_in(table):   # every 32-hex-digit string in any text column (tokens are such strings)
                found = set()
                for col in schema[table]:
                    for (v,) in db_query(db, 'SELECT "%s" FROM "%s"' % (col, table)):
                        if isinstance(v, str):
                            found.update(hexes.findall(v.encode()))
                return found
            before = {t: tokens_in(t) for t in schema if t != "meta"}
            assert before["messages"] and before["chats"] and before["signal_groups"] and before["queue"]
            assert db_query(db, "SELECT COUNT(*) FROM messages WHERE wa_sender IS NOT NULL")[0][0] >= 1
            rotate_key_via_cli(capsys, h, tmp_path)
            old = set().union(*before.values())
            for table in before:
                assert not tokens_in(table) & old, "%s still holds a token of the old key" % table
            # and every sealed value opens with the new key in its place
            store = open_store(db, NEW_SECRET)
            try:
                for table, (_, cols) in ws.SEALED.items():
                    for row in store.query("SELECT * FROM %s" % table):
                        for c in cols:
                            store.open_row(row, table, c)
            finally:
                store.close()
        finally:
            h.stop()

    def test_edit_of_a_group_message_bridged_before_rotation_still_reaches_signal(self, tmp_path, capsys):
        h = Harness(tmp_path).start()
        try:
            assert h.webhook(wa_message(SHARED_GROUP, "ED1", "before rotation", participant=MARTA))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 1)
            rotate_key_via_cli(capsys, h, tmp_path)
            h.start()
            target = "false_%s_ED1_%s" % (SHARED_GROUP, MARTA)
            assert h.webhook(wa_edit(SHARED_GROUP, target, "edited after rotation", "ED2", participant=MARTA))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 2)
            assert h.signal.sent()[1].get("editTimestamp") == h.signal.requests("send")[0]["timestamp"]
            assert h.signal.sent()[1]["message"].endswith("edited after rotation")
            assert h.app.metrics.get("whatsignal_rejected_total", reason="edit_not_by_author") == 0
            # someone else still cannot edit it
            target = "false_%s_ED1_%s" % (SHARED_GROUP, LUKAS)
            assert h.webhook(wa_edit(SHARED_GROUP, target, "forged", "ED3", participant=LUKAS))[0] == 200
            assert eventually(lambda: h.app.metrics.get("whatsignal_rejected_total", reason="edit_not_by_author") == 1)
        finally:
            h.stop()

    @pytest.mark.parametrize("named_by", ["row", "older release"])
    def test_prefetched_media_survives_rotation_and_leaves_no_plaintext_behind(self, tmp_path, capsys, named_by):
        h = Harness(tmp_path)
        h.raw["signal"]["rpcUrl"] = DEAD_URL      # Signal is down: the photo waits, prefetched
        h.start()
        try:
            url = h.waha.add_file("photo.jpg", JPEG_BYTES, "image/jpeg")
            assert h.webhook(wa_image(KLARA, "PH1", url))[0] == 200
            cache = h.raw["media"]["cacheDir"]
            assert eventually(lambda: os.path.isdir(cache) and len(os.listdir(cache)) == 1)
            h.waha.files.clear()                      # WAHA's copy expired meanwhile
            if named_by == "older release":           # a release before schema 5 named it after the dedupe token
                h.app.stop()
                h.app = None
                (dedupe,), = db_query(h.raw["database"]["path"], "SELECT dedupe FROM queue")
                os.replace(os.path.join(cache, os.listdir(cache)[0]), os.path.join(cache, "m-%s.jpg" % dedupe))
            rotate_key_via_cli(capsys, h, tmp_path)
            h.raw["signal"]["rpcUrl"] = h.signal.url
            h.start()
            assert eventually(lambda: len(h.signal.sent()) == 1, 20)
            sent = h.signal.sent()[0]
            assert "expired" not in sent["message"] and len(sent.get("attachments") or []) == 1
            assert eventually(lambda: os.listdir(cache) == [])   # sent: no decrypted photo stays behind
        finally:
            h.stop()


# ===========================================================================
# Nothing identifying unsealed; private files; media gone when its item ends
# ===========================================================================

def file_mode(path):
    return os.stat(path).st_mode & 0o777


class TestAtRest:

    def test_progress_of_a_message_sent_in_parts_is_sealed(self, tmp_path):
        h = Harness(tmp_path).start()
        try:
            assert h.webhook(wa_message(KLARA, "PP1", "send me both"))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 1)
            h.signal.attachments["first.jpg"] = JPEG_BYTES        # the second attachment cannot be fetched
            h.signal.push(owner_env(int(time.time() * 1000), "two photos", attachments=[
                {"contentType": "image/jpeg", "id": "first.jpg", "size": len(JPEG_BYTES)},
                {"contentType": "image/jpeg", "id": "missing.jpg", "size": len(JPEG_BYTES)}]))
            assert h.waha.wait_for(lambda f: len(f.sent()) == 1)
            db = h.raw["database"]["path"]
            assert eventually(lambda: db_query(db, "SELECT COUNT(*) FROM state WHERE key LIKE 's2w-progress:%'")[0][0] == 1)
            h.app.stop()
            h.app = None
            data = db_bytes(db)
            assert KLARA.split("@")[0].encode() not in data
            assert db_query(db, "SELECT value FROM state WHERE key LIKE 's2w-progress:%'") == [(None,)]
        finally:
            h.stop()

    def test_files_are_private_whatever_the_umask(self, tmp_path, capsys):
        old = os.umask(0o022)
        try:
            h = Harness(tmp_path)
            h.raw["signal"]["rpcUrl"] = DEAD_URL      # the photo waits in the cache
            h.raw["database"]["path"] = str(tmp_path / "data" / "whatsignal.db")
            h.start()
            try:
                url = h.waha.add_file("p.jpg", JPEG_BYTES, "image/jpeg")
                assert h.webhook(wa_image(KLARA, "PRV1", url))[0] == 200
                cache = h.raw["media"]["cacheDir"]
                assert eventually(lambda: os.path.isdir(cache) and len(os.listdir(cache)) == 1)
                db = h.raw["database"]["path"]
                assert file_mode(db) == 0o600 and file_mode(db + "-wal") == 0o600 and file_mode(db + "-shm") == 0o600
                assert file_mode(os.path.dirname(db)) == 0o700
                assert file_mode(cache) == 0o700
                assert file_mode(os.path.join(cache, os.listdir(cache)[0])) == 0o600
                cfg = write_config(tmp_path, h.raw)
                rc, out, err = run_main(capsys, ["--config", cfg, "backup", str(tmp_path / "backups") + "/",
                                                 "--with-config"], bridge_env())
                assert rc == 0, err
                report = json.loads(out)
                assert file_mode(str(tmp_path / "backups")) == 0o700
                assert file_mode(report["backup"]) == 0o600 and file_mode(report["config"]) == 0o600
                rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env())
                assert rc == 0 and "warning" not in json.loads(out)
            finally:
                h.stop()
        finally:
            os.umask(old)

    def test_verify_and_status_warn_when_others_can_read(self, tmp_path, capsys):
        h = Harness(tmp_path).start()
        try:
            assert h.webhook(wa_message(KLARA, "WR1", "hello there"))[0] == 200
            assert eventually(lambda: len(h.signal.sent()) == 1)
            db, cache = h.raw["database"]["path"], h.raw["media"]["cacheDir"]
            os.makedirs(cache, exist_ok=True)
            os.chmod(db, 0o644)
            os.chmod(cache, 0o755)
            h.signal.push(owner_env(int(time.time() * 1000), "/status"))
            assert eventually(lambda: any("readable by other users" in (t or "") for t in h.texts()))
            status = [t for t in h.texts() if "readable by other users" in (t or "")][0]
            assert db in status and cache in status and "chmod 600" in status and "chmod 700" in status
            cfg = write_config(tmp_path, h.raw)
            rc, out, err = run_main(capsys, ["--config", cfg, "verify"], bridge_env())
            report = json.loads(out)
            assert rc == 0 and db in report["warning"] and cache in report["warning"]
        finally:
            h.stop()

    def test_media_of_an_item_that_dies_is_deleted_at_once(self, tmp_path):
        clock = FakeClock(start=time.time())
        h = Harness(tmp_path, clock=clock.time).start()
        try:
            h.signal.mode = "down"                        # Signal stays down until the item expires
            url = h.waha.add_file("p.jpg", JPEG_BYTES, "image/jpeg")
            assert h.webhook(wa_image(KLARA, "DIE1", url))[0] == 200
            cache = h.raw["media"]["cacheDir"]
            assert eventually(lambda: os.path.isdir(cache) and len(os.listdir(cache)) == 1)
            db = h.raw["database"]["path"]
            assert eventually(lambda: db_query(db, "SELECT attempts FROM queue")[0][0] >= 1)
            kick(h, clock, 25 * 3600)                 # past bridge.expireAfterHours: the item dies
            assert eventually(lambda: db_query(db, "SELECT state FROM queue")[0][0] == "dead")
            assert eventually(lambda: os.listdir(cache) == [])
        finally:
            h.stop()


# ===========================================================================
# A fenced lease: one instance delivers, whatever the clocks do
# ===========================================================================

class TestLeaseFencing:

    def test_a_wall_clock_step_does_not_let_a_second_instance_deliver(self, tmp_path):
        h = Harness(tmp_path).start()
        second = None
        try:
            step = [0.0]
            second = ws.App(make_config(h.raw), ws.Log("debug", stream=LogCapture()),
                            clock=lambda: time.time() + step[0])
            second.lease.seconds = 3.0            # ticks every second: it would notice an expired lease at once
            second.start()
            assert h.app.lease.leader.is_set() and not second.lease.leader.is_set()
            step[0] = 20.0                        # the second instance's wall clock jumps 20 s ahead
            second.lease.tick()
            second.lease.tick()
            assert not second.lease.leader.is_set(), "a wall-clock step handed over a lease that is renewed"
            assert h.app.lease.leader.is_set()
            for n in range(6):   # (stored by the instance whose clock is right: the other's would date them ahead)
                assert h.webhook(wa_message(KLARA, "STEP%d" % n, "stepped %d" % n))[0] == 200
            assert eventually(lambda: len(h.texts()) == 6)
            assert sorted(s.split(": ", 1)[1] for s in h.texts()) == ["stepped %d" % n for n in range(6)]
            assert second.metrics.get("whatsignal_messages_processed_total", direction="w2s", kind="text",
                                      result="ok") == 0
            second.lease.tick()
            assert not second.lease.leader.is_set()
        finally:
            if second is not None:
                second.stop()
            h.stop()

    def test_no_send_and_no_record_without_proof_of_the_lease(self, tmp_path):
        h = Harness(tmp_path).start()
        try:
            for w in h.app.workers:                # this test steps the w2s delivery itself
                if isinstance(w, ws.Deliverer) and w.direction == "w2s":
                    w.stop()
            leader = h.app.lease.leader
            d = ws.Deliverer(h.app.bridge, "w2s", leader)
            db = h.raw["database"]["path"]
            holder, generation = db_query(db, "SELECT holder, generation FROM lease WHERE name='delivery'")[0]
            assert holder == h.app.lease.holder
            assert h.webhook(wa_message(KLARA, "FEN1", "fenced"))[0] == 200
            # another instance took the lease while this one was paused (it has not noticed yet)
            db_query(db, "UPDATE lease SET holder='otherhost:1:b', generation=generation+1, beat=beat+1"
                        " WHERE name='delivery'")
            assert leader.is_set()                 # its own monotonic deadline has not passed
            d.run_once()
            assert h.texts() == []                 # no send it cannot prove it may make
            item = db_query(db, "SELECT id FROM queue WHERE direction='w2s'")[0][0]
            with pytest.raises(ws.LeaseLost):       # nor any delivery recorded
                h.app.store.finish(item, "done", time.time(), fence=leader.fence)
            assert db_query(db, "SELECT state FROM queue WHERE id=?", (item,)) == [("pending",)]
            # the lease comes back (same generation): delivered exactly once
            db_query(db, "UPDATE lease SET holder=?, generation=? WHERE name='delivery'", (holder, generation))
            d.run_once()
            assert [s.endswith("fenced") for s in h.texts()] == [True]
            assert db_query(db, "SELECT state FROM queue WHERE id=?", (item,)) == [("done",)]
        finally:
            h.stop()

    def test_the_holder_stops_by_itself_when_it_cannot_renew(self, tmp_path):
        mono = FakeClock(start=1000.0)
        store = open_store(tmp_path / "l.db")
        try:
            keeper = ws.LeaseKeeper(store, ws.Log("error", stream=io.StringIO()), ws.new_metrics(), holder="A",
                                    seconds=15.0, monotonic=mono.time)
            keeper.tick()
            assert keeper.leader.is_set() and keeper.leader.proves()
            mono.advance(9.0)                      # renewals missed (a paused process): still inside its period
            assert keeper.leader.is_set()
            mono.advance(1.5)                      # two thirds of the period gone: it stops by itself
            assert not keeper.leader.is_set() and not keeper.leader.proves()
            keeper.tick()                          # a renewal brings it back
            assert keeper.leader.is_set()
        finally:
            store.close()


###############################################################################
# The fakes speak the upstream contracts ######################################
###############################################################################

TINY_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
TINY_JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


TEXT_ENVELOPE = fixture("signal-envelope-text-current-derived.json")


WAHA_AUTH = {"X-Api-Key": "waha-key"}


def running_fake(fake):
    """Run *fake* for one test; afterwards it must have met no internal error of its own."""
    fake.start()
    yield fake
    fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def waha_fake():
    yield from running_fake(FakeWaha())


@pytest.fixture
def daemon_fake():
    yield from running_fake(FakeSignalDaemon())


@pytest.fixture
def rest_fake():
    yield from running_fake(FakeSignalRest())


@pytest.fixture
def rest_ws_fake():
    yield from running_fake(FakeSignalRest(mode="json-rpc"))


# ============================================================================================
# WAHA
# ============================================================================================

def test_fakes_waha_auth_ping_health(waha_fake):
    assert re.match(r"^http://127\.0\.0\.1:\d+$", waha_fake.url)
    st, _, _, js = http_request(waha_fake.url, "GET", "/ping")
    assert (st, js) == (200, {"message": "pong"})
    st, _, _, js = http_request(waha_fake.url, "GET", "/health")
    assert (st, js) == (401, {"message": "Unauthorized", "statusCode": 401})
    st, _, _, js = http_request(waha_fake.url, "GET", "/health", headers={"X-Api-Key": "wrong"})
    assert st == 401
    st, _, _, js = http_request(waha_fake.url, "GET", "/health", headers=WAHA_AUTH)
    assert (st, js) == (200, {})
    st, _, _, _ = http_request(waha_fake.url, "GET", "/health?x-api-key=waha-key")
    assert st == 200
    call = waha_fake.calls[-1]
    assert set(["method", "path", "query", "headers", "json"]) <= set(call)
    assert call["query"] == {"x-api-key": "waha-key"}


def test_fakes_waha_send_text_seen_typing(waha_fake):
    body = {"chatId": "15550000002@c.us", "text": "hi", "session": "default"}
    st, r, _, js = http_request(waha_fake.url, "POST", "/api/sendText", body, WAHA_AUTH)
    assert st == 201 and r.get("Content-Type").startswith("application/json")
    assert re.match(r"^true_15550000002@c\.us_[0-9A-F]{20}$", js["id"]) and js["_data"] == {}
    assert waha_fake.calls[-1]["headers"]["x-api-key"] == "waha-key"   # case-insensitive headers
    assert waha_fake.calls[-1]["headers"]["X-API-KEY"] == "waha-key"
    group = {"chatId": "120363025555555555@g.us", "text": "g", "session": "default", "reply_to": None}
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", group, WAHA_AUTH)
    assert st == 201 and re.match(r"^true_120363025555555555@g\.us_[0-9A-F]{20}_15550000001@c\.us$", js["id"])
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendSeen",
                           {"chatId": "15550000002@c.us", "session": "default",
                            "messageIds": ["false_15550000002@c.us_AAA"]}, WAHA_AUTH)
    assert (st, js) == (201, {})
    for p in ("/api/startTyping", "/api/stopTyping"):
        st, _, _, js = http_request(waha_fake.url, "POST", p, {"chatId": "15550000002@c.us", "session": "default"}, WAHA_AUTH)
        assert (st, js) == (201, {"result": True})
    assert waha_fake.sent() == [body, group]
    assert waha_fake.sent("text") == [body, group] == waha_fake.sent("sendText")
    assert len(waha_fake.sent("seen")) == 1 and waha_fake.sent("image") == []


def test_fakes_waha_send_validation_and_media(waha_fake):
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", {"text": "x", "session": "default"}, WAHA_AUTH)
    assert st == 400 and js["statusCode"] == 400 and js["error"] == "Bad Request" and isinstance(js["message"], list)
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", {"chatId": "1@c.us", "text": "x"}, WAHA_AUTH)
    assert st == 400 and any("session" in m for m in js["message"])
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", b"{not json", {**WAHA_AUTH, "Content-Type": "application/json"})
    assert st == 400 and js["statusCode"] == 400
    img = {"chatId": "15550000002@c.us", "session": "default", "caption": "c",
           "file": {"mimetype": "image/jpeg", "filename": "a.jpg"}}
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendImage", img, WAHA_AUTH)
    assert st == 400
    img["file"]["data"] = "data:image/jpeg;base64," + base64.b64encode(TINY_JPEG).decode()
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendImage", img, WAHA_AUTH)
    assert st == 400 and any("data URI" in m for m in js["message"])
    img["file"]["data"] = base64.b64encode(TINY_JPEG).decode()
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendImage", img, WAHA_AUTH)
    assert st == 201 and js["id"].startswith("true_15550000002@c.us_")
    assert waha_fake.calls[-1]["file_bytes"] == TINY_JPEG
    voice = {"chatId": "15550000002@c.us", "session": "default",
             "file": {"mimetype": "audio/ogg; codecs=opus", "url": "http://x/v.ogg"}}
    st, _, _, _ = http_request(waha_fake.url, "POST", "/api/sendVoice", voice, WAHA_AUTH)
    assert st == 400  # convert is required
    voice["convert"] = False
    st, _, _, _ = http_request(waha_fake.url, "POST", "/api/sendVoice", voice, WAHA_AUTH)
    assert st == 201
    doc = {"chatId": "15550000002@c.us", "session": "default",
           "file": {"mimetype": "application/pdf", "filename": "a.pdf", "data": base64.b64encode(b"%PDF-1").decode()}}
    st, _, _, _ = http_request(waha_fake.url, "POST", "/api/sendFile", doc, WAHA_AUTH)
    assert st == 201
    assert [b["chatId"] for b in waha_fake.sent()] == ["15550000002@c.us"] * 3
    assert waha_fake.sent("image") == [img] and waha_fake.sent("voice") == [voice] and waha_fake.sent("file") == [doc]


def test_fakes_waha_reaction_edit_delete(waha_fake):
    r = {"messageId": "false_15550000002@c.us_3EB0AAAA", "reaction": "\U0001F44D", "session": "default"}
    st, _, _, js = http_request(waha_fake.url, "PUT", "/api/reaction", r, WAHA_AUTH)
    assert st == 200 and js["id"].startswith("true_15550000002@c.us_") and js["_data"] == {}
    st, _, _, _ = http_request(waha_fake.url, "POST", "/api/reaction", r, WAHA_AUTH)
    assert st == 404
    g = {"messageId": "false_120363025555555555@g.us_3EB0BBBB", "reaction": "", "session": "default"}
    st, _, _, _ = http_request(waha_fake.url, "PUT", "/api/reaction", g, WAHA_AUTH)
    assert st == 400  # group message id without _participant
    g["messageId"] += "_15550000004@c.us"
    st, _, _, _ = http_request(waha_fake.url, "PUT", "/api/reaction", g, WAHA_AUTH)
    assert st == 200
    path = "/api/default/chats/15550000002%40c.us/messages/true_15550000002%40c.us_3EB0CCCC"
    st, _, _, js = http_request(waha_fake.url, "PUT", path, {"text": "edited"}, WAHA_AUTH)
    assert st == 200 and "id" in js
    call = waha_fake.calls[-1]
    assert call["path"] == path and call["chatId"] == "15550000002@c.us"
    assert call["messageId"] == "true_15550000002@c.us_3EB0CCCC" and call["json"] == {"text": "edited"}
    st, _, _, _ = http_request(waha_fake.url, "PUT", path, {"nope": 1}, WAHA_AUTH)
    assert st == 400
    st, _, _, _ = http_request(waha_fake.url, "DELETE", path, headers=WAHA_AUTH)
    assert st == 200 and waha_fake.calls[-1]["method"] == "DELETE" and waha_fake.calls[-1]["chatId"] == "15550000002@c.us"


def test_fakes_waha_contacts_lids_sessions(waha_fake):
    waha_fake.contacts["15550000002@c.us"] = "Alice"
    waha_fake.lids["123456@lid"] = "15550000002@c.us"
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/contacts?contactId=15550000002%40c.us&session=default", headers=WAHA_AUTH)
    assert st == 200 and js["id"] == "15550000002@c.us" and js["name"] == "Alice" and js["number"] == "15550000002"
    assert {"pushname", "isMe", "isGroup"} <= set(js)
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/contacts?contactId=15550000009&session=default", headers=WAHA_AUTH)
    assert st == 200 and js["id"] == "15550000009@c.us" and js["name"] is None
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/default/lids/123456%40lid", headers=WAHA_AUTH)
    assert (st, js) == (200, {"lid": "123456@lid", "pn": "15550000002@c.us"})
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/default/lids/999%40lid", headers=WAHA_AUTH)
    assert js == {"lid": "999@lid", "pn": None}
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/sessions/default", headers=WAHA_AUTH)
    assert st == 200 and js["name"] == "default" and js["status"] == "WORKING" and js["config"] is None
    assert js["engine"] == {"engine": "GOWS"} and js["me"]["id"] == "15550000001@c.us"
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/sessions/nope", headers=WAHA_AUTH)
    assert st == 404 and js["statusCode"] == 404
    waha_fake.session_status = "STARTING"
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText",
                           {"chatId": "1@c.us", "text": "x", "session": "default"}, WAHA_AUTH)
    assert st == 422 and js["expected"] == ["WORKING"] and js["status"] == "STARTING" and js["session"] == "default"
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", {"chatId": "1@c.us", "text": "x", "session": "other"}, WAHA_AUTH)
    assert st == 404
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sessions/default/restart", headers=WAHA_AUTH)
    assert (st, js["name"], js["status"]) == (201, "default", "STARTING")
    assert waha_fake.session_status == "WORKING"
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sessions/default/start", headers=WAHA_AUTH)
    assert st == 201
    assert len(waha_fake.calls_for("/api/sessions/default/", "POST")) == 2
    st, _, _, _ = http_request(waha_fake.url, "POST", "/api/sendText", {"chatId": "1@c.us", "text": "x", "session": "default"}, WAHA_AUTH)
    assert st == 201


def test_fakes_waha_history_polls_and_participants(waha_fake):
    q = lambda path: http_request(waha_fake.url, "GET", path, headers=WAHA_AUTH)
    for i, (chat, ts) in enumerate((("1@c.us", 100), ("1@c.us", 300), ("2@c.us", 200))):
        waha_fake.remember({"id": "false_%s_M%d" % (chat, i), "timestamp": ts, "fromMe": False, "source": "app",
                          "body": "m%d" % i, "media": {"url": "u"}})
    st, _, _, js = q("/api/default/chats?sortBy=conversationTimestamp&sortOrder=desc&limit=5")
    assert st == 200 and js == [{"id": "1@c.us", "name": None, "conversationTimestamp": 300},
                                {"id": "2@c.us", "name": None, "conversationTimestamp": 200}]
    assert [c["id"] for c in q("/api/default/chats")[3]] == ["1@c.us", "2@c.us"]          # by id, ascending
    assert len(q("/api/default/chats?sortBy=conversationTimestamp&limit=1")[3]) == 1
    st, _, _, js = q("/api/default/chats/1%40c.us/messages?filter.timestamp.gte=150&downloadMedia=false")
    assert st == 200 and [m["body"] for m in js] == ["m1"] and js[0]["media"] is None and "source" not in js[0]
    js = q("/api/default/chats/1%40c.us/messages?limit=5")[3]                               # newest first
    assert [m["body"] for m in js] == ["m1", "m0"] and js[0]["media"] == {"url": "u"}
    assert [m["body"] for m in q("/api/default/chats/1%40c.us/messages?sortOrder=asc&limit=1")[3]] == ["m0"]
    assert q("/api/default/chats/1%40c.us/messages?limit=x")[0] == 400
    assert q("/api/other/chats")[0] == 404
    waha_fake.participants["9@g.us"] = ["1@c.us", "2@lid"]
    assert q("/api/default/groups/9%40g.us/participants/v2")[3] == [{"id": "1@c.us", "role": "participant"},
                                                                   {"id": "2@lid", "role": "participant"}]
    vote = {"chatId": "1@c.us", "pollMessageId": "false_1@c.us_P1", "votes": ["Yes"], "session": "default"}
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendPollVote", vote, WAHA_AUTH)
    assert st == 201 and js["id"].startswith("true_1@c.us_")
    assert http_request(waha_fake.url, "POST", "/api/sendPollVote", dict(vote, votes="Yes"), WAHA_AUTH)[0] == 400
    waha_fake.poll_votes = False
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendPollVote", vote, WAHA_AUTH)
    assert st == 422 and "available only in Plus" in js["message"]
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText",
                                {"chatId": "9@g.us", "text": "@1", "session": "default", "mentions": "1@c.us"}, WAHA_AUTH)
    assert st == 400 and "mentions must be an array of strings" in js["message"]


def test_fakes_waha_files(waha_fake):
    url = waha_fake.add_file("ABC.jpeg", TINY_JPEG, "image/jpeg")
    assert url == waha_fake.url + "/api/files/default/ABC.jpeg"
    st, r, raw, _ = http_request(waha_fake.url, "GET", "/api/files/default/ABC.jpeg", headers=WAHA_AUTH)
    assert st == 200 and raw == TINY_JPEG and r.get("Content-Type") == "image/jpeg"
    assert r.get("Content-Length") == str(len(TINY_JPEG))
    st, _, raw, _ = http_request(waha_fake.url, "GET", "/api/files/default/ABC.jpeg?x-api-key=waha-key")
    assert st == 200 and raw == TINY_JPEG
    st, _, _, _ = http_request(waha_fake.url, "GET", "/api/files/default/ABC.jpeg")
    assert st == 401
    st, _, _, js = http_request(waha_fake.url, "GET", "/api/files/default/missing.jpeg", headers=WAHA_AUTH)
    assert st == 404 and js == {"error": {"code": 404, "key": "FILE_NOT_FOUND", "message": "File not found",
                                          "details": "File not found or no longer available"}}
    waha_fake.files["/api/files/default/R.jpeg"] = {"redirect_to": "http://169.254.169.254/latest"}
    st, r, _, _ = http_request(waha_fake.url, "GET", "/api/files/default/R.jpeg", headers=WAHA_AUTH)
    assert st == 302 and r.get("Location") == "http://169.254.169.254/latest"
    waha_fake.files["/api/files/default/BIG.jpeg"] = {"body": b"0123456789", "content_type": "image/jpeg",
                                                 "lie_length": 10_000_000}
    c = http.client.HTTPConnection("127.0.0.1", waha_fake.port, timeout=5)
    c.request("GET", "/api/files/default/BIG.jpeg", headers=WAHA_AUTH)
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == "10000000"
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()
    waha_fake.files["/api/files/default/N.oga"] = {"body": b"x" * 100, "content_type": "audio/ogg", "no_length": True}
    st, r, raw, _ = http_request(waha_fake.url, "GET", "/api/files/default/N.oga", headers=WAHA_AUTH)
    assert st == 200 and r.get("Content-Length") is None and raw == b"x" * 100


def test_fakes_waha_fault_modes(waha_fake):
    body = {"chatId": "1@c.us", "text": "x", "session": "default"}
    waha_fake.mode = "down"
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        http_request(waha_fake.url, "POST", "/api/sendText", body, WAHA_AUTH)
    assert waha_fake.calls[-1]["status"] == "dropped"
    waha_fake.mode = "error"
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", body, WAHA_AUTH)
    assert st == 500 and js["statusCode"] == 500 and js["request"]["path"] == "/api/sendText"
    assert js["request"]["method"] == "POST" and "timestamp" in js and "exception" in js
    waha_fake.mode = "session_not_working"
    st, _, _, js = http_request(waha_fake.url, "POST", "/api/sendText", body, WAHA_AUTH)
    assert st == 422 and js["error"].startswith("Session status is not as expected")
    waha_fake.mode = "ok"
    assert waha_fake.sent() == []


def test_fakes_waha_slow_is_interrupted_by_stop():
    f = FakeWaha().start()
    f.mode, f.slow_seconds = "slow", 30
    outcome = []

    def client():
        try:
            outcome.append(http_request(f.url, "GET", "/health", headers=WAHA_AUTH, timeout=10)[0])
        except Exception as e:  # noqa: BLE001 - any failure is the expected outcome
            outcome.append(e)

    t = threading.Thread(target=client)
    t.start()
    assert f.wait_for(lambda w: len(w.calls) == 1, 3)
    t0 = time.monotonic()
    f.stop()
    assert time.monotonic() - t0 < 5.0                      # not held by the slow request
    t.join(5)
    assert outcome and isinstance(outcome[0], Exception)


def test_fakes_waha_hmac_vector_and_webhook(waha_fake):
    vector = ("208f8a55dde9e05519e898b10b89bf0d0b3b0fdf11fdbf09b6b90476301b98d8097c462b2b17a6ce93b6b4"
              "7a136cf2e78a33a63f6752c2c1631777076153fa89")
    assert FakeWaha.sign(b'{"event":"message","session":"default","engine":"WEBJS"}', "my-secret-key") == vector
    got = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, dict(self.headers.items()), body))
            out = b'{"ok":true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = "http://127.0.0.1:%d/waha?x=1" % srv.server_address[1]
        ev = waha_fake.event("message", {"id": "false_15550000002@c.us_AAA", "body": "h\u00e9llo", "fromMe": False})
        assert re.match(r"^evt_[0-9a-hjkmnp-tv-z]{26}$", ev["id"]) and len(str(ev["timestamp"])) == 13
        assert {"session", "engine", "environment", "me", "payload"} <= set(ev)
        before = int(time.time() * 1000)
        status, resp = waha_fake.webhook(url, ev, "sekret")
        assert (status, resp) == (200, {"ok": True})
        path, hdrs, body = got[-1]
        hdrs = {k.lower(): v for k, v in hdrs.items()}
        assert path == "/waha?x=1" and json.loads(body) == ev
        assert hdrs["content-type"] == "application/json"
        assert hdrs["x-webhook-hmac-algorithm"] == "sha512"
        assert hmac.compare_digest(hdrs["x-webhook-hmac"],
                                   hmac.new(b"sekret", body, hashlib.sha512).hexdigest())
        assert before - 1000 <= int(hdrs["x-webhook-timestamp"]) <= int(time.time() * 1000) + 1000
        assert hdrs["x-webhook-request-id"]
        status, _ = waha_fake.webhook(url, b'{"raw":1}', None, headers={"X-Extra": "1", "User-Agent": None})
        _, hdrs, body = got[-1]
        hdrs = {k.lower(): v for k, v in hdrs.items()}
        assert body == b'{"raw":1}' and "x-webhook-hmac" not in hdrs and hdrs["x-extra"] == "1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_fakes_waha_keepalive_and_bounded_wait(waha_fake):
    c = http.client.HTTPConnection("127.0.0.1", waha_fake.port, timeout=5)
    for _ in range(3):
        st, r, _, _ = http_request(waha_fake.url, "GET", "/health", headers=WAHA_AUTH, conn=c)
        assert st == 200 and r.get("Connection") != "close"
    c.close()
    assert len(waha_fake.calls) == 3
    t0 = time.monotonic()
    assert waha_fake.wait_for(lambda f: False, timeout=0.2) is False
    assert waha_fake.wait_for(lambda f: f.calls[99]["x"], timeout=0.1) is False  # exceptions = False
    assert time.monotonic() - t0 < 5.0                      # bounded by the timeouts, not unbounded
    assert waha_fake.wait_for(lambda f: len(f.calls) == 3, timeout=1) is True
    # the predicate runs without the fake's lock: it may itself call the fake over HTTP
    assert waha_fake.wait_for(lambda f: http_request(f.url, "GET", "/health", headers=WAHA_AUTH, timeout=2)[0] == 200, 3)
    # a background change wakes the waiter
    done = []
    timer = threading.Timer(0.1, lambda: done.append(http_request(waha_fake.url, "GET", "/ping")[0]))
    timer.start()
    assert waha_fake.wait_for(lambda f: f.calls[-1]["path"] == "/ping", 3)
    timer.join(3)
    assert done == [200]


# ============================================================================================
# signal-cli daemon
# ============================================================================================

def rpc_call(fake, method, params=None, rid=1, headers=None):
    body = {"jsonrpc": "2.0", "method": method, "id": rid}
    if params is not None:
        body["params"] = params
    st, r, raw, js = http_request(fake.url, "POST", "/api/v1/rpc", body, headers)
    assert st == 200 and r.get("Content-Type") == "application/json"
    assert js["jsonrpc"] == "2.0" and js["id"] == rid
    return js


def test_fakes_daemon_send_shapes_and_attachments(daemon_fake):
    js = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "hi"})
    res = js["result"]
    assert isinstance(res["timestamp"], int) and len(str(res["timestamp"])) == 13
    assert res["results"] == [{"recipientAddress": {"uuid": OWNER_UUID, "number": OWNER, "username": None},
                               "type": "SUCCESS"}]
    js2 = rpc_call(daemon_fake, "send", {"recipients": [OWNER, OWNER2], "message": "x", "quote-timestamp": 1767225600123,
                               "quote-author": OWNER, "quoteMessage": "q"}, rid="s2")
    assert js2["result"]["timestamp"] > res["timestamp"] and len(js2["result"]["results"]) == 2
    rec = daemon_fake.requests("send")[-1]
    assert rec["quote"] == {"timestamp": 1767225600123, "author": OWNER, "message": "q"}
    uri = "data:image/png;filename=pic%20one.png;base64," + base64.b64encode(TINY_PNG).decode()
    plain = "data:image/jpeg;base64," + base64.b64encode(TINY_JPEG).decode()
    js3 = rpc_call(daemon_fake, "send", {"recipient": [OWNER], "attachments": [uri, plain]})
    assert "result" in js3
    atts = daemon_fake.requests("send")[-1]["attachments"]
    assert atts == [{"mime": "image/png", "filename": "pic one.png", "data": TINY_PNG},
                    {"mime": "image/jpeg", "filename": None, "data": TINY_JPEG}]
    assert [p.get("message") for p in daemon_fake.sent()] == ["hi", "x", None]
    stamps = [r["result"]["timestamp"] for r in daemon_fake.requests("send")]
    assert stamps == sorted(set(stamps))


def test_fakes_daemon_contract_errors(daemon_fake):
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "x", "quoteTimestamp": "1767225600123",
                             "quoteAuthor": OWNER})["error"]
    assert e["code"] == -32603 and "java.lang.String" in e["message"] and e["data"] is None
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "x", "quoteTimestamp": 1767225600123})["error"]
    assert (e["code"], e["message"]) == (-1, "Quote author parameter is missing")
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": ""})["error"]
    assert e["code"] == -1 and e["message"].startswith("Sending empty message is not allowed")
    e = rpc_call(daemon_fake, "send", {"message": "x"})["error"]
    assert (e["code"], e["message"]) == (-1, "No recipients given")
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "x", "editTimestamp": 1.5})["error"]
    assert e["code"] == -32603
    e = rpc_call(daemon_fake, "sendReaction", {"recipient": OWNER, "emoji": "x", "targetAuthor": OWNER,
                                     "targetTimestamp": "5"})["error"]
    assert e["code"] == -32603
    e = rpc_call(daemon_fake, "nope")["error"]
    assert (e["code"], e["message"]) == (-32601, "Method not implemented")
    st, _, raw, _ = http_request(daemon_fake.url, "POST", "/api/v1/rpc", b'{"jsonrpc":"2.0","method":"version","id":1}',
                            {"Content-Type": "text/plain"})
    assert (st, raw) == (415, b"")
    st, _, raw, _ = http_request(daemon_fake.url, "POST", "/api/v1/rpc", {"jsonrpc": "2.0", "method": "version"})
    assert (st, raw) == (201, b"")
    batch = [{"jsonrpc": "2.0", "method": "version", "id": 1}, {"jsonrpc": "2.0", "method": "version"},
             {"jsonrpc": "2.0", "method": "nope", "id": 3}]
    st, _, _, js = http_request(daemon_fake.url, "POST", "/api/v1/rpc", batch)
    assert st == 200 and [x["id"] for x in js] == [1, 3] and js[0]["result"] == {"version": "0.14.6"}
    assert js[1]["error"]["code"] == -32601
    st, _, _, js = http_request(daemon_fake.url, "POST", "/api/v1/rpc", b"{oops", {"Content-Type": "application/json"})
    assert st == 200 and js["error"]["code"] == -32700
    st, _, _, _ = http_request(daemon_fake.url, "GET", "/api/v1/rpc")
    assert st == 405
    st, _, _, _ = http_request(daemon_fake.url, "POST", "/api/v1/rpc", {"jsonrpc": "2.0", "method": "version", "id": 1},
                          {"Host": "evil.example:8080"})
    assert st == 421
    st, r, raw, _ = http_request(daemon_fake.url, "GET", "/api/v1/check")
    assert (st, raw, r.get("Content-Length")) == (200, b"", "0")
    st, _, _, _ = http_request(daemon_fake.url, "GET", "/api/v1/other")
    assert st == 404


def test_fakes_daemon_scripted_and_partial_failures(daemon_fake):
    daemon_fake.errors.append((-4, "Failed to send message due to untrusted identities"))
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "x"})["error"]
    assert e["code"] == -4 and e["data"]["response"]["results"][0]["type"] == "IDENTITY_FAILURE"
    daemon_fake.errors.append((-5, "Failed to send message due to rate limiting", "send"))
    assert rpc_call(daemon_fake, "version")["result"] == {"version": "0.14.6"}   # filtered: not consumed
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER, "message": "x"})["error"]
    assert e["code"] == -5 and e["data"]["response"]["results"][0]["type"] == "RATE_LIMIT_FAILURE"
    assert not daemon_fake.errors
    daemon_fake.recipient_results[OWNER2] = "UNREGISTERED_FAILURE"
    res = rpc_call(daemon_fake, "send", {"recipient": [OWNER, OWNER2], "message": "x"})["result"]
    assert [r["type"] for r in res["results"]] == ["SUCCESS", "UNREGISTERED_FAILURE"]
    e = rpc_call(daemon_fake, "send", {"recipient": OWNER2, "message": "x"})["error"]
    assert e["code"] == -1 and e["data"]["response"]["results"][0]["type"] == "UNREGISTERED_FAILURE"


def test_fakes_daemon_methods(daemon_fake):
    daemon_fake.attachments["Vq3kZ8bX2mYpL0rT7sWd.jpg"] = TINY_JPEG
    res = rpc_call(daemon_fake, "getAttachment", {"id": "Vq3kZ8bX2mYpL0rT7sWd.jpg", "recipient": OWNER})["result"]
    assert base64.b64decode(res["data"]) == TINY_JPEG
    e = rpc_call(daemon_fake, "getAttachment", {"id": "missing.jpg"})["error"]
    assert (e["code"], e["message"]) == (-1, "Could not find attachment with ID: missing.jpg")
    created = rpc_call(daemon_fake, "updateGroup", {"name": "G", "member": [OWNER, OWNER2]})["result"]
    gid = created["groupId"]
    assert len(base64.b64decode(gid)) == 32 and isinstance(created["timestamp"], int)
    groups = rpc_call(daemon_fake, "listGroups")["result"]
    assert groups[0]["id"] == gid and groups[0]["name"] == "G"
    assert {m["number"] for m in groups[0]["members"]} == {BRIDGE, OWNER, OWNER2}
    res = rpc_call(daemon_fake, "send", {"groupId": gid, "message": "to group"})["result"]
    assert {r["recipientAddress"]["number"] for r in res["results"]} == {OWNER, OWNER2}
    assert all(r["groupId"] == gid for r in res["results"])
    e = rpc_call(daemon_fake, "send", {"group-id": base64.b64encode(b"x" * 32).decode(), "message": "m"})["error"]
    assert e["code"] == -1
    for method, params in [
        ("sendReaction", {"recipient": OWNER, "emoji": "\U0001F44D", "targetAuthor": OWNER,
                          "targetTimestamp": 1767225600123, "remove": True}),
        ("remoteDelete", {"recipient": OWNER, "targetTimestamp": 1767225600123}),
        ("sendTyping", {"recipient": OWNER, "stop": True}),
        ("sendTyping", {"groupId": gid}),
        ("sendReceipt", {"recipient": OWNER, "targetTimestamp": [1767225600123], "type": "viewed"}),
    ]:
        res = rpc_call(daemon_fake, method, params)["result"]
        assert isinstance(res["timestamp"], int) and isinstance(res["results"], list)
    e = rpc_call(daemon_fake, "sendTyping", {})["error"]
    assert (e["code"], e["message"]) == (-1, "No recipients given")
    assert rpc_call(daemon_fake, "trust", {"recipient": OWNER, "trustAllKnownKeys": True})["result"] == {}
    assert daemon_fake.trusted == [OWNER]
    daemon_fake.contacts[OWNER] = "Alice"
    contacts = rpc_call(daemon_fake, "listContacts")["result"]
    assert contacts[0]["number"] == OWNER and contacts[0]["name"] == "Alice" and contacts[0]["uuid"] == OWNER_UUID
    daemon_fake.pending.append(TEXT_ENVELOPE)
    assert rpc_call(daemon_fake, "receive", {"timeout": 0.1})["result"] == [TEXT_ENVELOPE]


def sse_connect(fake):
    c = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    c.request("GET", "/api/v1/events")
    r = c.getresponse()
    return c, r


def read_sse_event(r):
    lines = []
    while True:
        line = r.readline()
        if not line:
            raise EOFError
        if line == b":\n":
            continue
        if line == b"\n":
            return lines
        lines.append(line)


def test_fakes_daemon_sse_stream(daemon_fake):
    daemon_fake.keepalive_seconds = 0.2
    daemon_fake.push(TEXT_ENVELOPE)  # held until a stream connects (on-connection receive mode)
    c, r = sse_connect(daemon_fake)
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    assert r.getheader("Content-Length") is None and r.getheader("Transfer-Encoding") == "chunked"
    lines = read_sse_event(r)
    assert lines[0] == b"event:receive\n" and lines[1].startswith(b"data:{")
    assert json.loads(lines[1][5:]) == TEXT_ENVELOPE and len(lines) == 2
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 1)
    second = dict(TEXT_ENVELOPE, account=BRIDGE)
    daemon_fake.push_envelope(second["envelope"])
    assert json.loads(read_sse_event(r)[1][5:]) == second
    assert r.readline() == b":\n"  # keep-alive comment
    assert daemon_fake.delivered == [TEXT_ENVELOPE, second]
    assert daemon_fake.cut_mid_event() == 1
    got = b""
    with pytest.raises((http.client.IncompleteRead, EOFError, ConnectionError, ValueError)):
        while True:
            line = r.readline()
            if not line:
                raise EOFError
            got += line
            if line == b"\n":
                break
    assert not got.endswith(b"\n\n")
    c.close()
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 0)
    # a client that goes away is noticed without waiting for a keep-alive
    daemon_fake.keepalive_seconds = 30
    c, r = sse_connect(daemon_fake)
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 1)
    c.close()
    r.close()
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 0, 3)
    # stop() ends an open stream promptly
    c, r = sse_connect(daemon_fake)
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 1)
    t0 = time.monotonic()
    daemon_fake.stop()
    assert time.monotonic() - t0 < 5.0                      # the open stream does not hold stop()
    with pytest.raises((http.client.IncompleteRead, EOFError, ConnectionError, ValueError)):
        read_sse_event(r)
    c.close()


def test_fakes_daemon_close_streams_and_on_start_mode(daemon_fake):
    c, r = sse_connect(daemon_fake)
    assert daemon_fake.wait_for(lambda f: f.stream_connections == 1)
    assert daemon_fake.close_streams() == 1
    assert r.read() == b""  # clean end of the chunked stream
    c.close()
    daemon_fake.receive_mode = "on-start"
    assert daemon_fake.push(TEXT_ENVELOPE) is False and daemon_fake.dropped == 1 and not daemon_fake.pending


def test_fakes_daemon_faults(daemon_fake):
    daemon_fake.mode = "http500"
    st, _, _, js = http_request(daemon_fake.url, "POST", "/api/v1/rpc", {"jsonrpc": "2.0", "method": "version", "id": 1})
    assert st == 500 and js["error"]["code"] == -32603
    daemon_fake.mode = "down"
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        http_request(daemon_fake.url, "POST", "/api/v1/rpc", {"jsonrpc": "2.0", "method": "version", "id": 1})
    daemon_fake.mode = "ok"
    assert rpc_call(daemon_fake, "version")["result"]["version"] == "0.14.6"
    port = daemon_fake.port
    daemon_fake.stop()
    daemon_fake.start()   # restart keeps the port so clients can reconnect
    assert daemon_fake.port == port and rpc_call(daemon_fake, "version")["result"]["version"] == "0.14.6"


# ============================================================================================
# signal-cli-rest-api
# ============================================================================================

def test_fakes_rest_about_health(rest_fake):
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/about")
    assert st == 200 and js == {"versions": ["v1", "v2"], "build": 2, "mode": "normal", "version": "0.100",
                                "capabilities": {"v2/send": ["quotes", "mentions"]}}
    st, r, raw, _ = http_request(rest_fake.url, "GET", "/v1/health")
    assert (st, raw) == (204, b"")
    st, _, raw, _ = http_request(rest_fake.url, "GET", "/v1/nope")
    assert (st, raw) == (404, b"404 page not found")


def test_fakes_rest_send(rest_fake):
    body = {"number": BRIDGE, "recipients": [OWNER], "message": "hi"}
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", body)
    assert st == 201 and isinstance(js["timestamp"], str) and js["timestamp"].isdigit()
    st, _, _, js2 = http_request(rest_fake.url, "POST", "/v2/send", body)
    assert int(js2["timestamp"]) > int(js["timestamp"])
    att = {"number": BRIDGE, "recipients": [OWNER], "message": "",
           "base64_attachments": [base64.b64encode(TINY_PNG).decode(),
                                  "data:image/jpeg;filename=a b.jpg;base64," + base64.b64encode(TINY_JPEG).decode()]}
    st, _, _, _ = http_request(rest_fake.url, "POST", "/v2/send", att)
    assert st == 201
    assert rest_fake.calls[-1]["attachments"] == [{"mime": "image/png", "filename": None, "data": TINY_PNG},
                                             {"mime": "image/jpeg", "filename": "a b.jpg", "data": TINY_JPEG}]
    for bad, msg in [({"recipients": [OWNER], "message": "x"}, "number"),
                     ({"number": BRIDGE, "message": "x"}, "recipient"),
                     ({"number": BRIDGE, "recipients": [OWNER], "message": "x", "quote_timestamp": 1}, "Quote author"),
                     ({"number": BRIDGE, "recipients": [OWNER], "message": ""}, "empty message"),
                     ({"number": BRIDGE, "recipients": [OWNER], "message": "x", "quote_timestamp": "1",
                       "quote_author": OWNER}, "invalid request"),
                     ({"number": BRIDGE, "recipients": [OWNER, "group.abc"], "message": "x"}, "Groups")]:
        st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", bad)
        assert st == 400 and msg in js["error"], (bad, js)
    gid = rest_fake.add_group("G", [OWNER])
    st, _, _, _ = http_request(rest_fake.url, "POST", "/v2/send", {"number": BRIDGE, "recipients": [gid], "message": "g",
                                                         "quote_timestamp": 5, "quote_author": OWNER})
    assert st == 201
    assert len(rest_fake.sent()) == 4
    rest_fake.send_shape = "array"
    rest_fake.recipient_failures[OWNER2] = "UNREGISTERED_FAILURE"
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", {"number": BRIDGE, "recipients": [OWNER, OWNER2], "message": "x"})
    assert st == 201 and isinstance(js, list) and js[0]["timestamp"].isdigit()
    assert js[0]["errors"]["recipients"][0]["number"] == OWNER2
    assert js[0]["errors"]["recipients"][0]["reason"] == "UNREGISTERED_FAILURE"
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", {"number": BRIDGE, "recipient": OWNER, "message": "x"})
    assert st == 201 and "errors" not in js[0]
    rest_fake.send_shape = "object"
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", {"number": BRIDGE, "recipients": [OWNER, OWNER2], "message": "x"})
    assert st == 400  # 0.100 normal mode: a partial failure is a 400


def test_fakes_rest_actions(rest_fake):
    num = "/%2B15550000001"
    react = {"recipient": OWNER, "reaction": "\U0001F44D", "target_author": OWNER, "timestamp": 1767225600123}
    st, _, raw, _ = http_request(rest_fake.url, "POST", "/v1/reactions" + num, react)
    assert (st, raw) == (204, b"")
    st, _, _, js = http_request(rest_fake.url, "POST", "/v1/reactions/" + BRIDGE, dict(react, reaction=""))
    assert st == 400 and "reaction" in js["error"]
    st, _, _, _ = http_request(rest_fake.url, "POST", "/v1/reactions/" + BRIDGE, dict(react, timestamp="1767225600123"))
    assert st == 400
    st, _, _, _ = http_request(rest_fake.url, "DELETE", "/v1/reactions/" + BRIDGE, {k: v for k, v in react.items() if k != "reaction"})
    assert st == 204
    st, _, _, js = http_request(rest_fake.url, "DELETE", "/v1/remote-delete/" + BRIDGE, {"recipient": OWNER, "timestamp": 5})
    assert st == 201 and js["timestamp"].isdigit()
    for m in ("PUT", "DELETE"):
        st, _, _, _ = http_request(rest_fake.url, m, "/v1/typing-indicator/" + BRIDGE, {"recipient": OWNER})
        assert st == 204
    st, _, _, _ = http_request(rest_fake.url, "POST", "/v1/receipts/" + BRIDGE, {"recipient": OWNER, "receipt_type": "read",
                                                                   "timestamp": 5})
    assert st == 204
    st, _, _, _ = http_request(rest_fake.url, "POST", "/v1/receipts/" + BRIDGE, {"recipient": OWNER, "receipt_type": "seen",
                                                                   "timestamp": 5})
    assert st == 400
    st, _, _, _ = http_request(rest_fake.url, "PUT", "/v1/identities/%s/trust/%s" % (BRIDGE, OWNER), {"trust_all_known_keys": True})
    assert st == 204 and rest_fake.trusted == [OWNER]
    st, _, _, _ = http_request(rest_fake.url, "PUT", "/v1/identities/%s/trust/%s" % (BRIDGE, OWNER), {})
    assert st == 400
    st, _, _, js = http_request(rest_fake.url, "PUT", "/v1/typing-indicator/+15559999999", {"recipient": OWNER})
    assert st == 400 and "error" in js


def test_fakes_rest_attachments_and_groups(rest_fake):
    rest_fake.attachments["Vq3kZ8bX2mYpL0rT7sWd.png"] = TINY_PNG
    st, r, raw, _ = http_request(rest_fake.url, "GET", "/v1/attachments/Vq3kZ8bX2mYpL0rT7sWd.png")
    assert st == 200 and raw == TINY_PNG and r.get("Content-Type") == "image/png"
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/attachments/nope.jpg")
    assert (st, js) == (404, {"error": "No attachment with that name found"})
    internal = "b+hd++b2BpZA4n88MhTdsuNefYE/CPbd+FdDgFrEg4c="
    rest_id = "group.YitoZCsrYjJCcFpBNG44OE1oVGRzdU5lZllFL0NQYmQrRmREZ0ZyRWc0Yz0="
    assert FakeSignalRest.rest_group_id(internal) == rest_id
    assert FakeSignalRest.internal_group_id(rest_id) == internal
    st, _, _, js = http_request(rest_fake.url, "POST", "/v1/groups/" + BRIDGE, {"name": "Bridge", "members": [OWNER]})
    assert st == 201 and js["id"].startswith("group.")
    new_internal = FakeSignalRest.internal_group_id(js["id"])
    st, _, _, lst = http_request(rest_fake.url, "GET", "/v1/groups/" + BRIDGE)
    assert st == 200 and lst[0]["id"] == js["id"] and lst[0]["internal_id"] == new_internal
    assert lst[0]["members"] == [OWNER] and lst[0]["name"] == "Bridge"
    st, _, _, one = http_request(rest_fake.url, "GET", "/v1/groups/%s/%s" % (BRIDGE, urllib.parse.quote(js["id"], safe="")))
    assert st == 200 and one["internal_id"] == new_internal
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/groups/%s/%s" % (BRIDGE, urllib.parse.quote(rest_id, safe="")))
    assert (st, js) == (404, {"error": "No group with that id found"})


def test_fakes_rest_receive_polling(rest_fake):
    rest_fake.push(TEXT_ENVELOPE)
    rest_fake.push(dict(TEXT_ENVELOPE))
    st, r, raw, js = http_request(rest_fake.url, "GET", "/v1/receive/%s?timeout=1" % BRIDGE)
    assert st == 200 and r.get("Content-Type") == "text/plain; charset=utf-8" and js == [TEXT_ENVELOPE] * 2
    st, _, raw, js = http_request(rest_fake.url, "GET", "/v1/receive/%s?timeout=0" % BRIDGE)
    assert (st, raw) == (200, b"[]")
    threading.Timer(0.2, rest_fake.push, args=(TEXT_ENVELOPE,)).start()   # long poll wakes on push
    t0 = time.monotonic()
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/receive/%s?timeout=30" % BRIDGE, timeout=40)
    assert js == [TEXT_ENVELOPE] and time.monotonic() - t0 < 20      # woken by the push, not the 30 s timeout
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/receive/%s?ignore_attachments=yes" % BRIDGE)
    assert st == 400 and "ignore_attachments" in js["error"]


def test_fakes_rest_scripted_errors_and_faults(rest_fake):
    rest_fake.errors.append((429, {"error": "Failed to send message due to rate limiting. Use the attached challenge "
                                       "tokens", "challenge_tokens": ["tok"], "account": BRIDGE}))
    rest_fake.errors.append((400, "Failed to send message due to untrusted identities"))
    assert http_request(rest_fake.url, "GET", "/v1/about")[0] == 200   # GET does not consume 2-tuples
    body = {"number": BRIDGE, "recipients": [OWNER], "message": "x"}
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", body)
    assert st == 429 and js["challenge_tokens"] == ["tok"]
    st, _, _, js = http_request(rest_fake.url, "POST", "/v2/send", body)
    assert (st, js) == (400, {"error": "Failed to send message due to untrusted identities"})
    rest_fake.errors.append((500, {"error": "boom"}, "/v1/receive"))
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/receive/%s?timeout=0" % BRIDGE)
    assert (st, js) == (500, {"error": "boom"})
    assert rest_fake.sent() == []
    rest_fake.fault = "http500"
    assert http_request(rest_fake.url, "POST", "/v2/send", body)[0] == 500
    rest_fake.fault = "down"
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        http_request(rest_fake.url, "POST", "/v2/send", body)
    rest_fake.fault = "ok"
    assert http_request(rest_fake.url, "POST", "/v2/send", body)[0] == 201


class WsClient:
    """Tiny RFC 6455 client: masked frames out, unmasked frames in."""

    def __init__(self, port, path, key=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.key = key or base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (path, port, self.key)).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("no handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self):
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def send_frame(self, opcode, payload=b"", mask=True):
        n = len(payload)
        b1 = 0x80 if mask else 0
        hdr = struct.pack("!BB", 0x80 | opcode, b1 | n) if n < 126 else struct.pack("!BBH", 0x80 | opcode, b1 | 126, n)
        if mask:
            key = os.urandom(4)
            payload = key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        self.sock.sendall(hdr + payload)

    def close(self):
        self.sock.close()


def test_fakes_rest_websocket(rest_ws_fake):
    rest_fake = rest_ws_fake
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/about")
    assert js["mode"] == "json-rpc"
    assert rest_fake.push(TEXT_ENVELOPE) is False and rest_fake.dropped == 1   # no socket: dropped, not buffered
    st, _, _, js = http_request(rest_fake.url, "GET", "/v1/receive/" + BRIDGE)
    assert st == 400 and "websocket" in js["error"]
    ws = WsClient(rest_fake.port, "/v1/receive/%2B15550000001")
    expect = base64.b64encode(hashlib.sha1((ws.key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert ws.status == 101 and ws.headers["sec-websocket-accept"] == expect.decode()
    assert ws.headers["upgrade"].lower() == "websocket"
    assert rest_fake.wait_for(lambda f: f.ws_connections == 1)
    assert rest_fake.push(TEXT_ENVELOPE) is True
    op, payload = ws.recv_frame()
    assert op == 0x1 and json.loads(payload) == TEXT_ENVELOPE
    assert rest_fake.push(dict(TEXT_ENVELOPE, account="+19999999999")) is False   # other account: not forwarded
    ws.send_frame(0x9, b"hb")
    assert ws.recv_frame() == (0xA, b"hb")
    ws.send_frame(0x1, b'{"hello":1}')
    assert rest_fake.wait_for(lambda f: f.ws_received == ['{"hello":1}'])
    rest_fake.ping_seconds = 0.1
    rest_fake.push(TEXT_ENVELOPE)  # wakes the writer so the new ping interval applies
    assert ws.recv_frame()[0] == 0x1
    op, _ = ws.recv_frame()
    assert op == 0x9
    ws.send_frame(0xA, b"")
    assert rest_fake.wait_for(lambda f: f.pongs >= 1)
    rest_fake.ping_seconds = 54
    ws.send_frame(0x8, struct.pack("!H", 1000))
    while True:
        op, payload = ws.recv_frame()
        if op == 0x8:
            break
    assert struct.unpack("!H", payload[:2])[0] == 1000 and rest_fake.ws_close_codes == [1000]
    assert rest_fake.wait_for(lambda f: f.ws_connections == 0)
    ws.close()
    # unmasked client frame -> protocol error close 1002
    ws = WsClient(rest_fake.port, "/v1/receive/" + BRIDGE)
    ws.send_frame(0x1, b"x", mask=False)
    op, payload = ws.recv_frame()
    assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
    ws.close()
    assert rest_fake.wait_for(lambda f: f.ws_connections == 0)
    # abrupt close: EOF without a close frame
    ws = WsClient(rest_fake.port, "/v1/receive/" + BRIDGE)
    assert rest_fake.wait_for(lambda f: f.ws_connections == 1)
    assert rest_fake.close_ws_abruptly() == 1
    with pytest.raises((EOFError, ConnectionError)):
        ws.recv_frame()
    ws.close()
    # stop(): close frame 1001, then EOF, promptly
    ws = WsClient(rest_fake.port, "/v1/receive/" + BRIDGE)
    assert rest_fake.wait_for(lambda f: f.ws_connections == 1)
    t0 = time.monotonic()
    rest_fake.stop()
    assert time.monotonic() - t0 < 5.0                      # the open WebSocket does not hold stop()
    op, payload = ws.recv_frame()
    assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1001
    with pytest.raises((EOFError, ConnectionError)):
        ws.recv_frame()
    ws.close()


def test_fakes_rest_websocket_bad_handshake(rest_ws_fake):
    st, _, _, js = http_request(rest_ws_fake.url, "GET", "/v1/receive/" + BRIDGE,
                           headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                    "Sec-WebSocket-Key": "short"})
    assert st == 400 and "Sec-WebSocket-Key" in js["error"]


# ============================================================================================
# FakeClock
# ============================================================================================

def test_fakes_fake_clock():
    clock = FakeClock(start=1000.0, monotonic_start=5.0)
    assert clock.time() == 1000.0 and clock.monotonic() == 5.0
    clock.sleep(2.5)
    clock.advance(0.5)
    assert clock.time() == 1003.0 and clock.monotonic() == 8.0 and clock.sleeps == [2.5]
    assert clock.time_ms() == 1003000

###############################################################################
# Set-up, doctor and monitoring ###############################################
###############################################################################

# `init`, `webhook install|show`, `doctor`, /readyz, PORT, the process and file-system metrics the
# alert rules use, and the shipped monitoring files.  Helpers carry the prefix ``setup_``.

class TestReadinessAndProcessMetrics:
    def test_readyz_200_when_leader_and_all_upstreams_answer(self, bridge):
        status, _, _, rep = http_request(bridge.url, "GET", "/readyz")
        assert status == 200 and rep["ready"] is True and rep["role"] == "active"
        assert "waiting_for" not in rep

    def test_readyz_503_names_the_upstream_that_is_down(self, make_bridge):
        h = make_bridge(start=False).start()
        h.signal.stop()
        status, _, _, rep = http_request(h.url, "GET", "/readyz")
        assert status == 503 and rep["ready"] is False and rep["waiting_for"] == ["signal"]
        assert http_request(h.url, "GET", "/healthz")[0] == 200

    def test_readyz_503_on_the_standby_instance(self, make_bridge):
        h = make_bridge(start=False).start()
        standby = ws.App(make_config(h.raw), ws.Log("error", stream=LogCapture())).start()
        try:
            status, _, _, rep = http_request(standby.url, "GET", "/readyz")
            assert status == 503 and rep["role"] == "standby"
            assert rep["waiting_for"] == ["lease (another instance is active)"]
        finally:
            standby.stop()
        assert http_request(h.url, "GET", "/readyz")[0] == 200

    def test_process_and_filesystem_metrics(self, bridge):
        text = http_request(bridge.url, "GET", "/metrics")[2].decode()
        rss = metric_value(text, "process_resident_memory_bytes")
        assert rss is not None and 1 << 20 < rss < 1 << 34
        assert metric_value(text, "process_cpu_seconds_total") > 0
        assert metric_value(text, "process_open_fds") >= 3
        started = metric_value(text, "process_start_time_seconds")
        assert time.time() - 24 * 3600 < started <= time.time() + 5
        free, size = (metric_value(text, "whatsignal_data_fs_free_bytes"),
                      metric_value(text, "whatsignal_data_fs_size_bytes"))
        st = os.statvfs(str(bridge.tmp_path))
        assert 0 <= free <= size == st.f_blocks * st.f_frsize
        assert metric_value(text, "whatsignal_memory_limit_bytes") > rss
        for name in ("process_cpu_seconds_total", "whatsignal_encryption_errors_total",
                     "whatsignal_cleanup_failures_total"):
            assert "# TYPE %s counter" % name in text
        assert metric_value(text, "whatsignal_encryption_errors_total") == 0
        assert metric_value(text, "whatsignal_http_requests_total", path="/metrics", status="200") is None

    def test_cleanup_failure_is_counted(self, bridge):
        h = bridge
        with h.app.store.lock:
            h.app.store.db.close()
        assert ws.run_cleanup(h.app) is None
        assert h.app.metrics.get("whatsignal_cleanup_failures_total") == 1

    def test_port_environment_override(self, tmp_path):
        raw = offline_raw(tmp_path)
        assert ws.validate_config(copy.deepcopy(raw), bridge_env(PORT="9099")).get("server.port") == 9099
        with pytest.raises(ws.ConfigError) as e:
            ws.validate_config(copy.deepcopy(raw), bridge_env(PORT="80a"))
        assert [p for p in e.value.problems if p.startswith("PORT:")] == \
            ["PORT: '80a' is not a port number; set it to 1-65535 or unset it"]


# -- init, webhook, doctor against the fakes ---------------------------------------------------

class DeployedStack:
    """Fake WAHA and signal-cli, config.json and .env written by `init --yes`, and a bridge serving that config."""

    def __init__(self, tmp_path, capsys):
        self.tmp_path, self.capsys = tmp_path, capsys
        self.waha = FakeWaha(api_key=WAHA_KEY).start()
        self.signal = FakeSignalDaemon(number=BRIDGE).start()
        self.port = free_port()
        self.cfg = str(tmp_path / "config.json")
        self.env_path = str(tmp_path / ".env")
        self.app = None

    def init_argv(self, *extra):
        return ["--config", self.cfg, "init", "--yes", "--waha-url", self.waha.url, "--waha-api-key", WAHA_KEY,
                "--signal-rpc-url", self.signal.url, "--number", BRIDGE, "--owner", OWNER, "--port", str(self.port),
                "--db", str(self.tmp_path / "data" / "whatsignal.db"),
                "--cache-dir", str(self.tmp_path / "cache")] + list(extra)

    def main(self, *argv):
        return run_main(self.capsys, ["--config", self.cfg] + list(argv), {})

    def start_bridge(self):
        config = ws.load_config(self.cfg, ws.with_env_file(self.cfg, {}))
        self.app = ws.App(config, ws.Log("error", stream=LogCapture())).start()
        return self

    def env(self):
        return ws.read_env_file(self.env_path)

    def stop(self):
        if self.app:
            self.app.stop()
        self.waha.stop()
        self.signal.stop()


@pytest.fixture
def deployed_stack(tmp_path, capsys):
    """A stack ready for `webhook install`: init --yes done, the bridge serving."""
    s = DeployedStack(tmp_path, capsys)
    try:
        rc, out, err = run_main(capsys, s.init_argv(), {})
        assert rc == 0, err
        s.start_bridge()
        yield s
    finally:
        s.stop()


def doctor_lines(out):
    return [line for line in out.splitlines() if line.startswith(("ok ", "FAIL "))]


def doctor_failures(out):
    return [line for line in doctor_lines(out) if line.startswith("FAIL ")]


class TestInit:
    def test_init_yes_writes_private_files_that_check_config_accepts(self, tmp_path, capsys):
        s = DeployedStack(tmp_path, capsys)
        try:
            rc, out, err = run_main(capsys, s.init_argv(), {})
            assert rc == 0, err
            for path in (s.cfg, s.env_path):
                assert os.stat(path).st_mode & 0o777 == 0o600, path
            env = s.env()
            assert set(env) >= {"WEBHOOK_SECRET", "WAHA_API_KEY", "WHATSIGNAL_ENABLE_ENCRYPTION",
                                "WHATSIGNAL_ENCRYPTION_SECRET"}
            assert env["WAHA_API_KEY"] == WAHA_KEY and env["WHATSIGNAL_ENABLE_ENCRYPTION"] == "true"
            assert len(env["WEBHOOK_SECRET"]) >= 32 and len(env["WHATSIGNAL_ENCRYPTION_SECRET"]) >= 32
            assert env["WEBHOOK_SECRET"] != env["WHATSIGNAL_ENCRYPTION_SECRET"]
            raw = json.loads(open(s.cfg, encoding="utf-8").read())
            assert raw["whatsapp"]["webhookSecret"] == "env:WEBHOOK_SECRET" and raw["whatsapp"]["apiKey"] == "env:WAHA_API_KEY"
            assert (raw["signal"]["number"], raw["signal"]["destination"], raw["server"]["port"]) == (BRIDGE, OWNER, s.port)
            assert env["WEBHOOK_SECRET"] not in open(s.cfg, encoding="utf-8").read()
            # it says what it found upstream, and what comes next
            assert "WAHA 2026.7.1 at %s: session default is WORKING" % s.waha.url in out
            assert "signal-cli 0.14.6 at %s: +1555*****01 is registered" % s.signal.url in out
            assert "webhook install" in out and "doctor" in out
            assert env["WEBHOOK_SECRET"] not in out + err
            rc, out, err = s.main("check-config")
            assert rc == 0 and "configuration OK" in err, err
            assert json.loads(out)["whatsapp"]["webhookSecret"].startswith("***")
        finally:
            s.stop()

    def test_init_never_overwrites_without_force(self, tmp_path, capsys):
        s = DeployedStack(tmp_path, capsys)
        try:
            assert run_main(capsys, s.init_argv(), {})[0] == 0
            before = (open(s.cfg).read(), open(s.env_path).read())
            rc, out, err = run_main(capsys, s.init_argv(), {})
            assert rc == 2 and "already exist" in err and "--force" in err
            assert (open(s.cfg).read(), open(s.env_path).read()) == before
            rc, out, err = run_main(capsys, s.init_argv("--force"), {})
            assert rc == 0, err
            assert s.env()["WEBHOOK_SECRET"] not in before[1]     # new secrets
            assert os.stat(s.env_path).st_mode & 0o777 == 0o600
        finally:
            s.stop()

    @pytest.mark.parametrize("flag,value,expect", [
        ("--number", "4930123456", "--number: 4930****56 is not an E.164 number"),
        ("--owner", "+0123", "--owner: "),
        ("--waha-url", "localhost:3000", "--waha-url: 'localhost:3000' is not an http(s) URL"),
        ("--port", "99999", "--port: '99999' is not a port number"),
    ])
    def test_init_refuses_a_bad_answer_and_writes_nothing(self, tmp_path, capsys, flag, value, expect):
        s = DeployedStack(tmp_path, capsys)
        try:
            argv = s.init_argv()
            argv[argv.index(flag) + 1] = value
            rc, out, err = run_main(capsys, argv, {})
            assert rc == 2
            assert [l for l in err.splitlines() if l.startswith("config error: ")] == \
                [l for l in err.splitlines() if l.strip()]
            assert expect in err, err
            assert not os.path.exists(s.cfg) and not os.path.exists(s.env_path)
        finally:
            s.stop()

    def test_init_interactive_asks_with_defaults_and_validates_on_the_spot(self, tmp_path):
        waha = FakeWaha(api_key=WAHA_KEY).start()
        sig = FakeSignalDaemon(number=BRIDGE).start()
        try:
            answers = [waha.url, WAHA_KEY, "", sig.url, "12345", BRIDGE, OWNER, "", "", "", "", ""]
            p = subprocess.run([sys.executable, WS_PATH, "--config", str(tmp_path / "config.json"), "init"],
                               input="\n".join(answers) + "\n", cwd=str(tmp_path), env=clean_env(),
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr
            assert "WAHA URL [http://localhost:3000]: " in p.stdout
            assert "WAHA session [default]: " in p.stdout
            assert "is not an E.164 number" in p.stdout     # 12345, asked again
            assert "session default is WORKING" in p.stdout and "+1555*****01 is registered" in p.stdout
            raw = json.loads((tmp_path / "config.json").read_text())
            assert raw["whatsapp"]["session"] == "default" and raw["server"] == {"host": "127.0.0.1", "port": 8082}
            assert raw["signal"]["rpcUrl"] == sig.url and raw["database"]["path"] == "./whatsignal.db"
        finally:
            waha.stop()
            sig.stop()

    def test_init_compose_defaults(self, tmp_path, capsys):
        rc, out, err = run_main(capsys, ["--config", str(tmp_path / "config.json"), "init", "--yes", "--compose",
                                          "--number", BRIDGE, "--owner", OWNER], {})
        assert rc == 0, err
        raw = json.loads((tmp_path / "config.json").read_text())
        assert raw["whatsapp"]["apiUrl"] == "http://waha:3000" and raw["signal"]["rpcUrl"] == "http://signal-cli:8080"
        assert raw["server"] == {"host": "0.0.0.0", "port": 8082, "publicUrl": "http://whatsignal:8082/webhook/whatsapp"}
        assert raw["database"]["path"] == "/app/data/whatsignal.db"
        env = ws.read_env_file(str(tmp_path / ".env"))
        assert len(env["WAHA_API_KEY"]) >= 32 and env["WHATSIGNAL_UID"] == str(os.getuid())
        assert os.stat(str(tmp_path / "data")).st_mode & 0o777 == 0o700
        assert "docker compose up -d" in out and "docker compose exec whatsignal" in out
        assert "doctor checks them once the stack runs" in out


class TestWebhookInstall:
    def test_install_sets_exactly_the_right_webhook_keeps_others_and_is_a_noop_the_second_time(self, deployed_stack):
        s = deployed_stack
        other = {"url": "https://n8n.example/hook", "events": ["message.any"], "hmac": None, "retries": None,
                 "customHeaders": [{"name": "X-Team", "value": "ops"}]}
        s.waha.session_config = {"metadata": {"owner": "me"}, "webhooks": [other]}
        rc, out, err = s.main("webhook", "install")
        assert rc == 0, err
        url = "http://127.0.0.1:%d/webhook/whatsapp" % s.port
        want = {"url": url, "events": list(ws.WAHA_EVENTS), "hmac": {"key": s.env()["WEBHOOK_SECRET"]},
                "retries": {"policy": "exponential", "delaySeconds": 2, "attempts": 15}, "customHeaders": None}
        assert s.waha.session_config == {"metadata": {"owner": "me"}, "webhooks": [other, want]}
        assert "restarts session default" in err and s.waha.restarts == 1
        assert "webhook installed: %s" % url in out and "1 other webhook kept" in out
        assert s.env()["WEBHOOK_SECRET"] not in out + err
        puts = len(s.waha.calls_for("/api/sessions/default", method="PUT"))
        rc, out, err = s.main("webhook", "install")
        assert rc == 0 and "already right" in out and "nothing changed" in out
        assert len(s.waha.calls_for("/api/sessions/default", method="PUT")) == puts == 1
        assert s.waha.restarts == 1 and "restarts" not in err

    def test_install_replaces_an_earlier_url_of_the_bridge(self, deployed_stack):
        s = deployed_stack
        old = {"url": "http://old-host:8082/webhook/whatsapp", "events": ["message"], "hmac": {"key": "k" * 40},
               "retries": None, "customHeaders": None}
        s.waha.session_config = {"webhooks": [old]}
        s.waha.session_status = "STOPPED"
        rc, out, err = s.main("webhook", "install")
        assert rc == 0, err
        hooks = s.waha.session_config["webhooks"]
        assert [h["url"] for h in hooks] == ["http://127.0.0.1:%d/webhook/whatsapp" % s.port]
        assert s.waha.restarts == 0 and "warning" not in err     # a stopped session is not restarted

    def test_show_names_each_difference_with_the_fix(self, deployed_stack):
        s = deployed_stack
        url = "http://127.0.0.1:%d/webhook/whatsapp" % s.port
        s.waha.session_config = {"webhooks": [{"url": url, "events": ["message"], "hmac": {"key": "x" * 40},
                                               "retries": None, "customHeaders": None}]}
        rc, out, err = s.main("webhook", "show")
        assert rc == 1, err
        diffs = [l for l in out.splitlines() if l.startswith("DIFF ")]
        assert len(diffs) == 3, out
        assert "lacks the events message.reaction, message.edited" in diffs[0]
        assert "HMAC key is not WEBHOOK_SECRET" in diffs[1] and "401" in diffs[1]
        assert "no retry policy" in diffs[2]
        assert all(d.endswith("fix: run `python3 whatsignal.py webhook install`") or
                   "webhook install" in d for d in diffs)
        assert "x" * 40 not in out and "HMAC: set" in out and "<- this bridge" in out
        assert s.main("webhook", "install")[0] == 0
        rc, out, err = s.main("webhook", "show")
        assert rc == 0 and out.strip().endswith("HMAC, retries)") and "DIFF" not in out

    def test_errors_say_cause_and_fix(self, deployed_stack):
        s = deployed_stack
        s.waha.api_key = "another-key"
        rc, out, err = s.main("webhook", "install")
        assert rc == 2 and "WAHA refused the API key (401)" in err and "WAHA_API_KEY" in err
        s.waha.api_key = WAHA_KEY
        rc, out, err = s.main("webhook", "show", "--session", "nosuch")
        assert rc == 2 and "WAHA has no session 'nosuch'" in err and "/api/sessions" in err
        assert "Traceback" not in err


# (id, how to break the set-up, the failing check, cause must contain, fix must contain)
BROKEN_SETUPS = [
    ("wrong-hmac-key", lambda s: s.waha.session_config["webhooks"][0]["hmac"].update(key="k" * 44),
     "webhook default", "HMAC key is not WEBHOOK_SECRET", "webhook install"),
    ("session-scan-qr", lambda s: setattr(s.waha, "session_status", "SCAN_QR_CODE"),
     "waha session default", "session default is SCAN_QR_CODE, not WORKING", "auth/qr?format=image"),
    ("signal-cli-421", lambda s: setattr(s.signal, "bound_port", 8080),
     "signal-cli", "answered 421", "--http 0.0.0.0:"),
    ("number-not-registered", lambda s: s.signal.unregistered.add(BRIDGE),
     "signal number", "+1555*****01 is not registered", "link -n WhatSignal"),
    ("owner-untrusted", lambda s: s.signal.identities.update({OWNER: "UNTRUSTED"}),
     "owner identity +1555*****02", "UNTRUSTED", "trust -a %s" % OWNER),
    ("db-secret-wrong", lambda s: rewrite_env(s, WHATSIGNAL_ENCRYPTION_SECRET="another-secret-" + "z" * 30),
     "database", "does not open this database", "use the secret it was created with"),
    ("env-readable-by-others", lambda s: os.chmod(s.env_path, 0o644),
     "files", "readable by other users", "chmod 600"),
    ("no-public-url", lambda s: edit_config(s, ("server", "host"), "0.0.0.0"),
     "webhook default", "server.publicUrl is not set", "set server.publicUrl to it, e.g. http://whatsignal:"),
    ("bridge-not-running", lambda s: stop_stack_bridge(s),
     "self-test webhook", "nothing answers at http://127.0.0.1:", "start the bridge"),
]


def rewrite_env(s, **changes):
    env = s.env()
    env.update(changes)
    ws._write_private(s.env_path, "".join("%s=%s\n" % kv for kv in env.items()))


def edit_config(s, path, value):
    with open(s.cfg, encoding="utf-8") as f:
        raw = json.load(f)
    raw[path[0]][path[1]] = value
    ws._write_private(s.cfg, json.dumps(raw))


def stop_stack_bridge(s):
    s.app.stop()
    s.app = None


class TestDoctor:
    def test_doctor_passes_on_a_correct_setup_and_sends_the_test_message(self, deployed_stack):
        s = deployed_stack
        s.signal.identities[OWNER] = "TRUSTED_UNVERIFIED"
        assert s.main("webhook", "install")[0] == 0
        rc, out, err = s.main("doctor", "--send-test")
        assert rc == 0, out + err
        lines = doctor_lines(out)
        assert not doctor_failures(out)
        names = [l.split(":", 1)[0].split(None, 1)[1] for l in lines]
        assert names == ["config", "files", "database", "waha", "waha session default", "webhook default",
                         "self-test webhook", "signal-cli", "signal number", "owner identity +1555*****02",
                         "send test +1555*****02"]
        assert "WAHA 2026.7.1 (GOWS, CORE)" in out and "signal-cli 0.14.6" in out
        assert "no event from WAHA stored yet" in out
        ev = s.waha.event("session.status", {"status": "WORKING"})
        assert s.waha.webhook(s.app.url + "/webhook/whatsapp", ev, s.env()["WEBHOOK_SECRET"])[0] == 200
        rc, out, err = s.main("doctor")
        assert rc == 0 and re.search(r"last event from WAHA stored \d+ s ago", out), out
        assert out.strip().endswith("all checks passed")
        sent = s.signal.sent("send")
        assert len(sent) == 1 and sent[0]["recipient"] == [OWNER] and "WhatSignal doctor" in sent[0]["message"]
        assert s.env()["WEBHOOK_SECRET"] not in out and s.env()["WHATSIGNAL_ENCRYPTION_SECRET"] not in out
        assert s.app.metrics.get("whatsignal_webhook_auth_failures_total") == 0

    @pytest.mark.parametrize("name,breakit,check,cause,fix", BROKEN_SETUPS, ids=[b[0] for b in BROKEN_SETUPS])
    def test_doctor_names_the_broken_link_and_its_fix(self, deployed_stack, name, breakit, check, cause, fix):
        s = deployed_stack
        assert s.main("webhook", "install")[0] == 0
        assert s.main("doctor")[0] == 0
        breakit(s)
        rc, out, err = s.main("doctor")
        assert rc == 1, out
        fails = doctor_failures(out)
        assert len(fails) == 1, out
        head, _, tail = fails[0].partition("; fix: ")
        assert head.startswith("FAIL  %s: " % check), fails[0]
        assert cause in head and fix in tail, fails[0]
        assert "Traceback" not in out + err and out.strip().endswith("1 check failed")

    def test_doctor_reports_an_invalid_config_as_failed_lines(self, deployed_stack):
        s = deployed_stack
        rewrite_env(s, WEBHOOK_SECRET="short")
        rc, out, err = s.main("doctor")
        assert rc == 1
        fails = doctor_failures(out)
        assert len(fails) == 1 and fails[0].startswith("FAIL  config: whatsapp.webhookSecret: only 5 characters")
        assert "fix: use at least 32" in fails[0]


# -- packaging and monitoring files ------------------------------------------------------------

def read_repo_file(*parts):
    with open(os.path.join(REPO_DIR, *parts), encoding="utf-8") as f:
        return f.read()


def alert_rules():
    """The rules of monitoring/alerts.yml as dicts, read with a small parser for this file's plain YAML subset."""
    rules, rule, section = [], None, None
    for line in read_repo_file("monitoring", "alerts.yml").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^      - alert: (\S+)$", line)
        if m:
            rule = {"alert": m.group(1), "labels": {}, "annotations": {}}
            rules.append(rule)
            section = None
            continue
        m = re.match(r"^        (expr|for|labels|annotations):\s*(.*)$", line)
        if m and rule is not None:
            if m.group(1) in ("labels", "annotations"):
                section = m.group(1)
            else:
                rule[m.group(1)] = m.group(2)
            continue
        m = re.match(r'^          (\w+): "?(.*?)"?$', line)
        if m and rule is not None and section:
            rule[section][m.group(1)] = m.group(2)
            continue
        assert re.match(r"^(groups:|  - name: [a-z-]+|    rules:)$", line), "unexpected line: %r" % line
    return rules


def dashboard_exprs():
    dash = json.loads(read_repo_file("monitoring", "dashboard.json"))
    return dash, [t["expr"] for p in dash["panels"] for t in p["targets"]]


METRIC_NAME = re.compile(r"\b((?:whatsignal|process)_[a-z_]+)\b")


class TestPackagingAndMonitoring:
    def test_alerts_cover_the_operations_guide(self):
        rules = alert_rules()
        names = {r["alert"] for r in rules}
        assert {"WhatSignalDown", "WhatSignalEncryptionErrors", "WhatSignalDiskAlmostFull", "WhatSignalMemoryHigh",
                "WhatSignalCleanupFailed", "WhatSignalHighLatency", "WhatSignalWebhookAuthFailures"} <= names
        assert len(names) == len(rules)
        for r in rules:
            assert r.get("expr"), r
            assert r["labels"].get("severity") in ("critical", "warning"), r
            assert r["annotations"].get("summary") and r["annotations"].get("description"), r
        by = {r["alert"]: r for r in rules}
        assert "0.90" in by["WhatSignalDiskAlmostFull"]["expr"] and "0.80" in by["WhatSignalMemoryHigh"]["expr"]
        assert by["WhatSignalDown"]["labels"]["severity"] == "critical"
        assert by["WhatSignalWebhookAuthFailures"]["labels"]["severity"] == "warning"

    def test_every_metric_the_rules_and_dashboard_use_is_exported(self, bridge):
        round_trip(bridge)
        assert post_signed(bridge, b"{not json")[0] == 400
        ws.run_cleanup(bridge.app)
        text = http_request(bridge.url, "GET", "/metrics")[2].decode()
        exported = set(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))
        kinds = dict(exported)
        dash, exprs = dashboard_exprs()
        used = set()
        for expr in [r["expr"] for r in alert_rules()] + exprs:
            for name in METRIC_NAME.findall(expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                used.add(base if kinds.get(base) == "histogram" else name)
        assert used - set(kinds) == set(), "used but not exported: %s" % sorted(used - set(kinds))
        for name in used:     # and each has a sample now, after traffic and a cleanup
            assert re.search(r"^%s(_bucket)?(\{[^}]*\})? " % re.escape(name), text, re.M), name
        titles = [p["title"] for p in dash["panels"]]
        for want in ("Queue depth", "Delivery latency", "Dead letters", "Authentication failures", "Cleanup"):
            assert any(t.startswith(want) for t in titles), want

    def test_promtool_accepts_the_rules_and_the_dashboard_queries(self, tmp_path):
        promtool = shutil.which("promtool")
        if not promtool:
            pytest.skip("promtool is not installed (apt-get install prometheus); the other tests check the names")
        p = subprocess.run([promtool, "check", "rules", os.path.join(REPO_DIR, "monitoring", "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr
        # the alerts fire on made-up series: disk 95 % full, memory 85 %, auth failures, p95 57 s, target down
        p = subprocess.run([promtool, "test", "rules", os.path.join(REPO_DIR, "monitoring", "alerts.test.yml")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr
        _, exprs = dashboard_exprs()
        rules = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
            "      - record: dashboard:q%d\n        expr: %s\n" % (i, json.dumps(e)) for i, e in enumerate(exprs))
        (tmp_path / "dashboard-rules.yml").write_text(rules)
        p = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard-rules.yml")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr

    def test_dockerfile_is_pinned_and_installs_nothing(self):
        text = read_repo_file("Dockerfile")
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert len(froms) == 1 and re.fullmatch(r"python:3\.\d+-slim@sha256:[0-9a-f]{64}", froms[0]), froms
        assert not re.search(r"apt-get|apk |pip install|wget|curl", text)
        assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"-c\", \"import urllib.request", text, re.M)
        assert re.search(r"^USER 10001:10001$", text, re.M)

    def test_compose_runs_the_whole_stack(self):
        text = read_repo_file("docker-compose.yml")
        services = dict(re.findall(r"^  ([a-z-]+):\n((?:    .*\n|\n)+)", text.split("\nnetworks:\n")[0], re.M))
        assert set(services) == {"waha", "signal-cli", "whatsignal"}
        for name, body in services.items():
            assert "restart: unless-stopped" in body, name
            image = re.search(r"^    image: (\S+)$", body, re.M).group(1)
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
        sig, bridge, waha = services["signal-cli"], services["whatsignal"], services["waha"]
        assert '"--receive-mode", "on-connection"' in sig and '"--http", "0.0.0.0:8080"' in sig
        assert "read_only: true" in bridge and "no-new-privileges:true" in bridge and "cap_drop: [ALL]" in bridge
        assert "env_file: .env" in bridge and "networks: [internal]" in bridge
        assert re.search(r'test: \["CMD", "python", "-c", "import urllib.request', bridge)
        assert "healthcheck:" in waha and "${WAHA_API_KEY" in waha
        assert re.search(r"^  internal:\n    internal: true", text, re.M)
        raw = json.loads(json.dumps({"server": {"host": "0.0.0.0", "port": 8082}}))   # what init --compose writes
        assert "http://whatsignal:%d/webhook/whatsapp" % raw["server"]["port"] == ws.INIT_DEFAULTS["public_url"][1]
        assert ws.INIT_DEFAULTS["waha_url"][1] == "http://waha:3000"
        assert ws.INIT_DEFAULTS["signal_rpc_url"][1] == "http://signal-cli:8080"


class TestDoctorRest:
    def test_doctor_with_signal_cli_rest_api(self, tmp_path, capsys):
        waha = FakeWaha(api_key=WAHA_KEY).start()
        rest = FakeSignalRest(number=BRIDGE).start()
        app = None
        try:
            port = free_port()
            cfg = str(tmp_path / "config.json")
            rc, out, err = run_main(capsys, ["--config", cfg, "init", "--yes", "--waha-url", waha.url,
                                             "--waha-api-key", WAHA_KEY, "--signal-rest-url", rest.url,
                                             "--number", BRIDGE, "--owner", OWNER, "--port", str(port),
                                             "--db", str(tmp_path / "ws.db"), "--cache-dir", str(tmp_path / "c")], {})
            assert rc == 0, err
            assert "signal-cli-rest-api 0.100 at %s: %s is registered" % (rest.url, ws.mask_phone(BRIDGE)) in out
            app = ws.App(ws.load_config(cfg, ws.with_env_file(cfg, {})), ws.Log("error", stream=LogCapture())).start()
            assert run_main(capsys, ["--config", cfg, "webhook", "install"], {})[0] == 0
            rest.identities[OWNER] = "TRUSTED_VERIFIED"
            rc, out, err = run_main(capsys, ["--config", cfg, "doctor"], {})
            assert rc == 0, out + err
            assert "signal-cli-rest-api 0.100 (mode normal)" in out and "trusted (TRUSTED_VERIFIED)" in out
            rest.identities[OWNER] = "UNTRUSTED"
            rc, out, err = run_main(capsys, ["--config", cfg, "doctor"], {})
            fails = doctor_failures(out)
            assert rc == 1 and len(fails) == 1 and "UNTRUSTED" in fails[0]
            assert "/v1/identities/%s/trust/%s" % (BRIDGE, OWNER) in fails[0]
        finally:
            if app:
                app.stop()
            waha.stop()
            rest.stop()


class TestDoctorMultiAccount:
    def test_the_owner_identity_is_read_from_the_bridge_account_of_a_multi_account_daemon(self, deployed_stack):
        s = deployed_stack
        s.signal.accounts = ["+15550000009", BRIDGE]      # a daemon started without -a
        s.signal.identities[OWNER] = "UNTRUSTED"
        doctor = ws.Doctor(ws.load_config(s.cfg, ws.with_env_file(s.cfg, {})), s.cfg, {}, io.StringIO())
        with pytest.raises(ws.CheckFailed) as failed:
            doctor.check_identity(OWNER)
        assert "UNTRUSTED" in failed.value.cause and "trust -a %s" % OWNER in failed.value.fix


def test_fakes_waha_session_update_like_waha():
    waha = FakeWaha(api_key=WAHA_KEY).start()
    try:
        key = {"X-Api-Key": WAHA_KEY}
        hook = {"url": "http://b:8082/webhook/whatsapp", "events": ["message"]}
        st, _, _, js = http_request(waha.url, "PUT", "/api/sessions/default", {"config": {"webhooks": [hook]}}, key)
        assert st == 200 and js["name"] == "default" and js["status"] == "WORKING"
        assert js["config"]["webhooks"] == [dict(hook, hmac=None, retries=None, customHeaders=None)]
        assert waha.restarts == 1
        st, _, _, js = http_request(waha.url, "GET", "/api/sessions/default", headers=key)
        assert st == 200 and js["config"]["webhooks"][0]["url"] == hook["url"]
        st, _, _, js = http_request(waha.url, "PUT", "/api/sessions/default", {"config": {"webhooks": [{"url": 1}]}},
                                    key)
        assert st == 400 and js["error"] == "Bad Request"
        assert http_request(waha.url, "PUT", "/api/sessions/other", {"config": {}}, key)[0] == 404
        assert http_request(waha.url, "PUT", "/api/sessions/default", {"config": {}})[0] == 401
        waha.session_status = "STOPPED"
        st, _, _, js = http_request(waha.url, "PUT", "/api/sessions/default", {"config": {"metadata": {"a": "b"}}}, key)
        assert st == 200 and js["status"] == "STOPPED" and js["config"] == {"metadata": {"a": "b"}}
        assert waha.restarts == 1        # a stopped session is not started by an update
    finally:
        waha.stop()
