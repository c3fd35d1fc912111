#!/usr/bin/env python3
"""WhatSignal: read and answer your WhatsApp chats from Signal.

One person, one bridge.  WAHA (the WhatsApp HTTP API) posts every WhatsApp
event to WhatSignal as a signed webhook; WhatSignal stores it, then forwards it
to the owner's Signal through signal-cli.  The owner answers in Signal (quote
to pick a chat, or just write to answer the last one) and WhatSignal delivers
the answer to the right WhatsApp chat.  The people on WhatsApp never know.

    WhatsApp ──> WAHA ──webhook (HMAC)──> WhatSignal ──JSON-RPC / REST──> signal-cli ──> owner's Signal
                  ^                        |  SQLite (WAL, encrypted)               |
                  └──── sendText/... <─────┴──── SSE / poll / WebSocket <───────────┘

Every event is committed to SQLite before it is acknowledged, delivered by a
worker with retries and backoff, in order per chat, and deduplicated by its
upstream id, so a crash, a restart or an upstream outage loses nothing.

What it deliberately does not do: it is not a multi-user service (each
channel has exactly one owner), not a cluster (two instances may share one
volume on one host, only one delivers at a time), and it never trusts a
payload: media is fetched only from WAHA's own origin, nothing from a payload
becomes a file path, and only the configured owner can speak through it.

Security: webhooks must carry WAHA's HMAC-SHA512 signature; message text,
phone numbers, chat ids and names are encrypted at rest (scrypt-derived keys,
BLAKE2b keystream, HMAC-SHA256 encrypt-then-MAC, each value bound to its table,
column and row) with keyed lookup tokens; secrets, text and full numbers never
reach the logs; the files are readable by the bridge's user only; one instance
delivers at a time (a fenced lease).  The server binds to 127.0.0.1 by default.

Sections (grep -n '^# .*###' whatsignal.py):
    Constants and defaults, Errors, Logging and metrics, Configuration,
    Pure helpers, Encryption, Translation, Store, Clients, Bridge, Workers,
    HTTP server, Operations, Application, Simulators, Set-up, Command line, Benchmark

XXX / Known gaps:
    - Signal rich text (styles) and WhatsApp stories are not bridged; polls,
      calls, view-once media and mentions arrive as text (see README).
    - Catch-up reads at most the newest bridge.catchUpMaxMessages of a chat per
      pass; poll and call state is keyed by lookup tokens that rotate-key does
      not recompute (votes on polls forwarded before a rotation become replies).
    - Groups layout: no group avatars (WhatsApp pictures live on WhatsApp's CDN,
      and media is fetched only from WAHA).
    - signal-cli's SSE stream has no acknowledgement: an envelope on the wire at
      the instant of a kill -9 is lost (contract limit; see README, Reliability).
    - `doctor` proves the bridge accepts a signed webhook on its own address and
      that WAHA's session config points at server.publicUrl, not that WAHA can
      actually reach that URL (WAHA has no "test webhook" call).
    - Ingest on a quiet 2-core machine stays under half a bare
      ThreadingHTTPServer's request rate (bench): concurrent webhooks share one
      commit, but the bridge spends several times the bare server's CPU per
      message (the standard library's HTTP parsing, HMAC, JSON, sealing, and
      delivering the same messages meanwhile in the same interpreter).
"""

__version__ = "1.0.0"

import argparse
import base64
import binascii
import collections
import contextlib
import datetime
import difflib
import email.parser
import hashlib
import hmac
import http.client
import http.server
import io
import json
import math
import os
import random
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import threading
import time
import urllib.parse

###############################################################################
# Constants and defaults ######################################################
###############################################################################

DEFAULT_PORT = 8082
WEBHOOK_PATH = "/webhook/whatsapp"    # where WAHA posts its events
READ_TIMEOUT = 30.0                   # idle keep-alive / slow client limit (s)
REQUEST_TIMEOUT = 10.0                # a whole request (line, headers, body) must arrive within this (s)
MAX_CONNECTIONS = 256                 # open HTTP connections (one handler thread each); more get 503 at once
SMALL_BODY = 64 * 1024                # bodies up to this size may use the body budget's last reserve
BODY_RESERVE = 2 * 1024 * 1024        # ... of this many bytes, so large unverified bodies cannot starve them
UPSTREAM_TIMEOUT = 10.0               # one call to WAHA or signal-cli (s)
BACKOFF_START = 1.0                   # first retry delay (s)
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 300.0                   # never wait longer than this between tries
EXPIRE_AFTER_HOURS = 24               # a message still failing after this is given up
AUTH_FAIL_LIMIT = 20                  # failed signatures per client before 429
AUTH_FAIL_WINDOW = 60.0               # ... within this many seconds
HEALTH_CACHE_SECONDS = 5.0            # upstream health checks are cached this long
CONTACT_TTL = 24 * 3600               # contact names are refreshed after a day
JSON_STRING_LIMIT = 20000000          # signal-cli's Jackson reader: longest JSON string (chars) it accepts
MEDIA_REFUSED_TTL = 24 * 3600         # media WAHA refused to send goes as text this long, then is tried again
MEDIA_PLACEHOLDER = {"image": "[photo]", "video": "[video]", "voice": "[voice message]", "file": "[file]"}
SSE_SILENCE = 45.0                    # a signal-cli SSE stream silent this long is dead (keep-alive 15 s)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 4   # key derivation of new databases: 16 MiB, twice the old work
SCRYPT_LEGACY = (2 ** 15, 8, 1)                # databases that record no "kdf" were created with this (32 MiB)
QUOTE_PREVIEW = 60                    # characters of an unknown quoted message shown inline
STALE_MARGIN = 3600.0                 # webhooks older than retentionDays minus this are refused as replays
LEASE_SECONDS = 15.0                  # delivery lease held by the active instance
SESSION_POLL_SECONDS = 60.0           # each WAHA session's status is read this often (webhooks can be lost)
STARTING_STUCK_SECONDS = 300.0        # a session STARTING longer than this is stuck
CATCHUP_MARGIN = 600.0                # catch-up reads this far before the last stored event (s): clock skew, retries
CATCHUP_PACE = 0.25                   # pause between two WAHA calls of a catch-up pass (s)
CATCHUP_RETRY = 60.0                  # a catch-up pass that failed (WAHA down) is tried again after this (s)
SCHEMA_VERSION = 6

# WAHA events the bridge handles; every other event is stored nowhere and answered 200.
WAHA_EVENTS = ("message", "message.reaction", "message.edited", "message.revoked",
               "message.ack", "message.ack.group", "session.status", "message.any", "call.received",
               "call.accepted", "call.rejected", "poll.vote")
HELD_REASON = "held until /reopen"
SESSION_DOWN = ("STOPPED", "FAILED", "SCAN_QR_CODE", "PASSKEY_REQUIRED",
                "PASSKEY_CONFIRMATION_REQUIRED")

###############################################################################
# Errors ######################################################################
###############################################################################


class WhatSignalError(Exception):
    """Base of every error WhatSignal raises on purpose."""


class ConfigError(WhatSignalError):
    """The configuration is unusable; ``problems`` has one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class PayloadError(WhatSignalError):
    """A webhook or envelope is malformed: answer 4xx, never retry."""


class CryptoError(WhatSignalError):
    """A value failed authentication, or the secret does not open the database."""


class StoreError(WhatSignalError):
    """The database cannot take a write right now (locked, disk full)."""


class LeaseLost(WhatSignalError):
    """This instance no longer holds the delivery lease: it must not send, nor record a delivery."""


class UpstreamError(WhatSignalError):
    """A call to WAHA or signal-cli failed."""


class TransientError(UpstreamError):
    """Worth retrying later: connection refused, timeout, 5xx, rate limit."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class IdentityError(TransientError):
    """signal-cli refuses to send: the owner's safety number changed."""


class HeldError(TransientError):
    """Kept on purpose until the owner acts (a chat whose Signal group the owner left)."""


class SignalSetupError(HeldError):
    """signal-cli refuses the bridge itself (its Host check, an unknown account): a configuration error.

    Items stay queued, without expiring, until it is fixed.
    """


class CaptchaRequired(HeldError):
    """Signal wants a captcha before the bridge's account sends more: hold, and say how to solve it."""

    def __init__(self, message, token, retry_after, step):
        super().__init__(message, max(retry_after or 0.0, 300.0))
        self.token = token
        self.step = step


class Muted(WhatSignalError):
    """The item's chat is muted: kept (state 'muted'), not forwarded, until the owner asks for it."""


class PermanentError(UpstreamError):
    """Retrying cannot help: park the item as dead and tell the owner."""


class MediaRefused(PermanentError):
    """signal-cli cannot take this attachment (too large for its JSON reader, or unreadable)."""


class WahaMediaRefused(PermanentError):
    """WAHA cannot send this kind of media: Core's 422 "available only in Plus version" or an
    engine's "not implemented by the engine" (WAHA src/core/exceptions.ts)."""

    def __init__(self, message, plus):
        super().__init__(message)
        self.plus = plus


###############################################################################
# Logging and metrics #########################################################
###############################################################################

LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}


class Log:
    """JSON lines on stderr: ``ts``, ``level``, ``msg`` and fields.

    Callers pass only masked values (see ``mask_phone``); message text and
    secrets are never given to the logger at any level.
    """

    def __init__(self, level="info", stream=None, clock=time.time):
        self.level = LEVELS.get(level, 20)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.lock = threading.Lock()

    def _emit(self, level, msg, fields):
        if LEVELS[level] < self.level:
            return
        ts = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        rec = {"ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
               "level": "WARN" if level == "warn" else level.upper(), "msg": msg}
        rec.update(fields)
        line = json.dumps(rec, ensure_ascii=False, default=str)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # pragma: no cover - stderr closed
                pass

    def debug(self, msg, **f):
        self._emit("debug", msg, f)

    def info(self, msg, **f):
        self._emit("info", msg, f)

    def warn(self, msg, **f):
        self._emit("warn", msg, f)

    def error(self, msg, **f):
        self._emit("error", msg, f)


class Metrics:
    """Counters, gauges and histograms rendered as Prometheus text 0.0.4."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds = {}      # name -> (type, help)
        self.values = {}     # (name, labels) -> float
        self.hists = {}      # (name, labels) -> [bucket counts..., sum, count]

    def describe(self, name, kind, help_text):
        self.kinds[name] = (kind, help_text)

    def inc(self, name, value=1.0, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + value

    def set(self, name, value, **labels):
        with self.lock:
            self.values[(name, tuple(sorted(labels.items())))] = float(value)

    def get(self, name, **labels):
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def observe(self, name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            h = self.hists.setdefault(key, [0] * len(self.BUCKETS) + [0.0, 0])
            for i, b in enumerate(self.BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    @staticmethod
    def _labels(pairs, extra=()):
        pairs = list(pairs) + list(extra)
        if not pairs:
            return ""
        esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return "{" + ",".join('%s="%s"' % (k, esc(v)) for k, v in pairs) + "}"

    def render(self):
        out, seen = [], set()
        with self.lock:
            items = sorted(self.values.items()) + sorted(self.hists.items())
        for (name, labels), v in items:
            if name not in seen:
                seen.add(name)
                kind, help_text = self.kinds.get(name, ("untyped", name))
                out.append("# HELP %s %s" % (name, help_text))
                out.append("# TYPE %s %s" % (name, kind))
            if isinstance(v, list):
                for i, b in enumerate(self.BUCKETS):
                    out.append("%s_bucket%s %d" % (name, self._labels(labels, [("le", repr(float(b)))]), v[i]))
                out.append("%s_bucket%s %d" % (name, self._labels(labels, [("le", "+Inf")]), v[-1]))
                out.append("%s_sum%s %r" % (name, self._labels(labels), v[-2]))
                out.append("%s_count%s %d" % (name, self._labels(labels), v[-1]))
            else:
                out.append("%s%s %r" % (name, self._labels(labels), v))
        for name in sorted(set(self.kinds) - seen):   # described but not yet observed
            kind, help_text = self.kinds[name]
            out += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
        return "\n".join(out) + "\n"


def new_metrics():
    """Return a Metrics registry with every WhatSignal metric described."""
    m = Metrics()
    for name, kind, text in (
        ("whatsignal_build_info", "gauge", "Version of the running bridge."),
        ("whatsignal_messages_processed_total", "counter", "Bridged items by direction, kind and result."),
        ("whatsignal_http_requests_total", "counter", "HTTP requests by path and status."),
        ("whatsignal_webhook_auth_failures_total", "counter", "Webhooks refused for a bad or missing signature."),
        ("whatsignal_unauthorized_senders_total", "counter", "Signal envelopes from someone other than the owner."),
        ("whatsignal_dead_letters_total", "counter", "Items given up after a permanent failure."),
        ("whatsignal_untrusted_identity_total", "counter", "Sends refused because the owner's safety number changed."),
        ("whatsignal_rejected_total", "counter", "Malformed or hostile input refused, by reason."),
        ("whatsignal_queue_depth", "gauge", "Items waiting for delivery, by direction."),
        ("whatsignal_delivery_latency_seconds", "histogram", "From receipt to delivery, by direction."),
        ("whatsignal_cleanup_duration_seconds", "gauge", "Duration of the last retention cleanup."),
        ("whatsignal_cleanup_last_success_timestamp_seconds", "gauge", "Unix time of the last successful cleanup."),
        ("whatsignal_database_size_bytes", "gauge", "Size of the database and its WAL."),
        ("whatsignal_media_files_count", "gauge", "Files in the media cache."),
        ("whatsignal_leader", "gauge", "1 when this instance runs the delivery workers."),
        ("whatsignal_encryption_errors_total", "counter", "Stored values that failed to decrypt or authenticate."),
        ("whatsignal_cleanup_failures_total", "counter", "Retention cleanups that failed."),
        ("whatsignal_data_fs_free_bytes", "gauge", "Bytes free to the bridge on the database's file system."),
        ("whatsignal_data_fs_size_bytes", "gauge", "Total bytes of the database's file system."),
        ("whatsignal_memory_limit_bytes", "gauge", "Memory the process may use: the cgroup limit, else physical RAM."),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
        ("process_open_fds", "gauge", "Number of open file descriptors."),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
        ("whatsignal_catchup_recovered_total", "counter", "WhatsApp messages recovered by catch-up after downtime."),
    ):
        m.describe(name, kind, text)
    m.set("whatsignal_build_info", 1, version=__version__)
    for name in ("whatsignal_webhook_auth_failures_total", "whatsignal_unauthorized_senders_total",
                 "whatsignal_dead_letters_total", "whatsignal_untrusted_identity_total",
                 "whatsignal_encryption_errors_total", "whatsignal_cleanup_failures_total",
                 "whatsignal_catchup_recovered_total"):
        m.set(name, 0)
    return m


def _read_text(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def process_stats():
    """The standard Prometheus process_* values for this process (Linux /proc; fewer elsewhere)."""
    cpu = os.times()
    out = {"process_cpu_seconds_total": cpu.user + cpu.system}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    statm = _read_text("/proc/self/statm")
    if statm:
        fields = statm.split()
        out["process_virtual_memory_bytes"] = int(fields[0]) * page
        out["process_resident_memory_bytes"] = int(fields[1]) * page
    with contextlib.suppress(OSError):
        out["process_open_fds"] = len(os.listdir("/proc/self/fd"))
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource
        out["process_max_fds"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    stat, boot = _read_text("/proc/self/stat"), _read_text("/proc/stat")
    if stat and boot:
        with contextlib.suppress(ValueError, IndexError, OSError, StopIteration):
            ticks = int(stat.rsplit(")", 1)[1].split()[19])      # field 22, starttime, in clock ticks since boot
            btime = int(next(l.split()[1] for l in boot.splitlines() if l.startswith("btime ")))
            out["process_start_time_seconds"] = btime + ticks / os.sysconf("SC_CLK_TCK")
    return out


def memory_limit():
    """Bytes this process may use: the cgroup (v2, then v1) memory limit, else physical RAM; None if unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = (_read_text(path) or "").strip()
        if text.isdigit() and int(text) < 1 << 60:        # "max" / a huge number: no limit set
            return int(text)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None  # pragma: no cover


def fs_space(path):
    """(free bytes for an unprivileged writer, total bytes) of the file system holding *path*, or None."""
    probe = os.path.abspath(path or ".")
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

###############################################################################
# Configuration ###############################################################
###############################################################################

# Every accepted key: dotted path -> (type, default, what it is).  A default of
# REQUIRED means the key must be given; None means "absent is fine".
REQUIRED = object()
DEFAULTS = {
    "server.host": (str, "127.0.0.1", "address to listen on (0.0.0.0 inside Docker)"),
    "server.port": (int, DEFAULT_PORT, "port for webhooks, /health and /metrics"),
    "server.metricsToken": (str, None, "bearer token required on /metrics when set"),
    "server.maxBodyMB": (int, 10, "largest webhook body accepted, in MB"),
    "server.maxConnections": (int, MAX_CONNECTIONS, "open HTTP connections; more are answered 503 at once"),
    "server.requestTimeoutSeconds": (float, REQUEST_TIMEOUT, "a whole request (headers and body) must arrive within this"),
    "server.publicUrl": (str, None, "URL WAHA posts webhooks to (webhook install, doctor); "
                                    "default http://<server.host>:<server.port>/webhook/whatsapp"),
    "whatsapp.apiUrl": (str, REQUIRED, "WAHA base URL; media is fetched only from its origin"),
    "whatsapp.apiKey": (str, None, "WAHA X-Api-Key"),
    "whatsapp.session": (str, "default", "WAHA session of the single default channel"),
    "whatsapp.webhookSecret": (str, None, "WAHA webhook HMAC key (>= 32 chars); WEBHOOK_SECRET"),
    "whatsapp.mediaBaseUrl": (str, None, "origin WAHA writes in media URLs (its WAHA_BASE_URL) if not apiUrl's"),
    "whatsapp.mirrorDeletes": (bool, True, "a WhatsApp deletion deletes the Signal copy (else a notice)"),
    "whatsapp.sessionAutoRestart": (bool, False,
                                    "restart a FAILED/STOPPED WAHA session, or one STARTING over 5 minutes, with backoff"),
    "signal.rpcUrl": (str, None, "signal-cli daemon --http URL (JSON-RPC + SSE)"),
    "signal.apiUrl": (str, None, "signal-cli-rest-api URL (instead of rpcUrl)"),
    "signal.number": (str, REQUIRED, "the bridge's own Signal account, E.164"),
    "signal.destination": (str, None, "the owner's Signal number, E.164"),
    "signal.trustNewIdentity": (bool, False, "trust the owner's new safety number automatically"),
    "signal.pollIntervalSeconds": (float, 1.0, "REST normal/native mode: receive poll interval"),
    "signal.attachmentDir": (str, None, "directory signal-cli reads at the same path: media over ~15 MB goes as a file"),
    "bridge.layout": (str, "inbox", "inbox (one conversation) or groups (one Signal group per chat)"),
    "bridge.expireAfterHours": (float, EXPIRE_AFTER_HOURS, "give up on a message still failing after this"),
    "bridge.groupCreatePerMinute": (float, 6.0, "groups layout: new Signal groups per minute after a burst of 5"),
    "bridge.ignoreChats": (list, [], "chats never forwarded, by id (+number, …@c.us, …@g.us) or exact name"),
    "bridge.mirrorOwnMessages": (bool, True, "show what you write on your phone as 'You → Alice: text'"),
    "bridge.catchUpHours": (float, 72.0, "after downtime, read from WAHA what was missed, at most this far back"),
    "bridge.catchUpMaxChats": (int, 50, "catch-up: chats read per pass, most recently active first"),
    "bridge.catchUpMaxMessages": (int, 100, "catch-up: messages read per chat and pass, the newest"),
    "database.path": (str, "./whatsignal.db", "SQLite file; DB_PATH"),
    "database.synchronous": (str, "NORMAL", "SQLite synchronous: NORMAL survives kill -9, FULL also power loss"),
    "media.cacheDir": (str, "./cache", "media cache directory; MEDIA_DIR"),
    "media.maxSizeMB": (int, 50, "largest media bridged, in MB"),
    "media.retentionDays": (int, None, "media cache retention (default: retentionDays)"),
    "retentionDays": (int, 30, "mappings and delivered items are kept this long"),
    "cleanupIntervalHours": (float, 24.0, "how often the retention cleaner runs"),
    "logLevel": (str, "info", "debug, info, warn or error"),
}
CHANNEL_KEYS = {"whatsappSession": str, "signalDestination": str}
ENV_OVERRIDES = {"WHATSAPP_API_URL": "whatsapp.apiUrl", "SIGNAL_RPC_URL": "signal.rpcUrl",
                 "SIGNAL_API_URL": "signal.apiUrl", "DB_PATH": "database.path",
                 "MEDIA_DIR": "media.cacheDir", "WHATSIGNAL_HOST": "server.host",
                 "PORT": "server.port"}
SECRET_KEYS = ("whatsapp.apiKey", "whatsapp.webhookSecret", "server.metricsToken")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")

Channel = collections.namedtuple("Channel", "session destination")
Channel.__doc__ = "One WAHA session paired with one owner's Signal number."


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        path = prefix + str(k)
        if isinstance(v, dict):
            yield from _flatten(v, path + ".")
        else:
            yield path, v


def _resolve_env(value, path, environ, problems):
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in environ:
            problems.append("%s: environment variable %s is not set; export it or put the value in the config"
                            % (path, name))
            return None
        return environ[name]
    return value


def _check_type(path, value, kind, problems):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        shown = "(value hidden)" if path in SECRET_KEYS else repr(value)
        problems.append("%s: expected %s, got %s %s; fix the value in the config"
                        % (path, kind.__name__, type(value).__name__, shown))
        return None
    return value


def _check_url(path, value, problems):
    u = urllib.parse.urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname:
        problems.append("%s: %r is not an http(s) URL; use e.g. http://localhost:3000" % (path, value))


def load_config(path, environ):
    """Read the JSON config at *path*, overlay *environ*, validate; return a Config.

    Raises ConfigError with one line per problem.
    """
    problems = []
    raw = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(["config file %s not found; copy config.example.json there or pass --config" % path])
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(["config file %s cannot be read (%s); check its permissions" % (path, e.__class__.__name__)])
        except json.JSONDecodeError as e:
            raise ConfigError(["config file %s is not valid JSON (line %d column %d: %s); fix the syntax"
                               % (path, e.lineno, e.colno, e.msg)])
        if not isinstance(raw, dict):
            raise ConfigError(["config file %s must hold a JSON object" % path])
    return validate_config(raw, environ, problems)


def validate_config(raw, environ, problems=None):
    """Validate a parsed config dict against DEFAULTS; return a Config or raise ConfigError."""
    problems = problems if problems is not None else []
    values = {}
    channels_raw = raw.pop("channels", None) if isinstance(raw, dict) else None
    for path, value in _flatten(raw):
        if path not in DEFAULTS:
            close = difflib.get_close_matches(path, list(DEFAULTS) + ["channels"], n=1)
            problems.append("%s: unknown key%s; remove it or fix the spelling"
                            % (path, " (did you mean %s?)" % close[0] if close else ""))
            continue
        value = _resolve_env(value, path, environ, problems)
        if value is not None:
            value = _check_type(path, value, DEFAULTS[path][0], problems)
        if value is not None:
            values[path] = value
    for env, path in ENV_OVERRIDES.items():
        if environ.get(env):
            values[path] = environ[env]
            if path == "server.port":
                if not environ[env].strip().isdigit():
                    problems.append("PORT: %r is not a port number; set it to 1-65535 or unset it" % environ[env])
                    values.pop(path)
                    continue
                values[path] = int(environ[env])
            if path == "signal.rpcUrl":
                values.pop("signal.apiUrl", None)
            elif path == "signal.apiUrl":
                values.pop("signal.rpcUrl", None)
    if "whatsapp.webhookSecret" not in values and environ.get("WEBHOOK_SECRET"):
        values["whatsapp.webhookSecret"] = environ["WEBHOOK_SECRET"]
    for path, (kind, default, _) in DEFAULTS.items():
        if path not in values:
            if default is REQUIRED:
                problems.append("%s: missing; set it in the config file" % path)
            values[path] = None if default is REQUIRED else default
    cfg = Config(values, environ)
    cfg.channels = _validate_channels(channels_raw, values, problems)
    cfg.implicit_channel = channels_raw is None
    _validate_values(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate_channels(channels_raw, values, problems):
    if channels_raw is None:
        dest = values.get("signal.destination")
        if not dest:
            problems.append("signal.destination: missing; set the owner's Signal number (E.164) or list channels")
            return []
        return [Channel(values.get("whatsapp.session") or "default", dest)]
    if not isinstance(channels_raw, list) or not channels_raw:
        problems.append("channels: must be a non-empty list of {whatsappSession, signalDestination}")
        return []
    out = []
    for i, ch in enumerate(channels_raw):
        where = "channels[%d]" % i
        if not isinstance(ch, dict):
            problems.append("%s: must be an object {whatsappSession, signalDestination}" % where)
            continue
        for k in ch:
            if k not in CHANNEL_KEYS:
                problems.append("%s.%s: unknown key; use whatsappSession and signalDestination" % (where, k))
        sess, dest = ch.get("whatsappSession"), ch.get("signalDestination")
        if not isinstance(sess, str) or not sess:
            problems.append("%s.whatsappSession: missing; name the WAHA session" % where)
        elif any(c.session == sess for c in out):
            problems.append("%s.whatsappSession: %r is listed twice; each session has one owner" % (where, sess))
        if not isinstance(dest, str) or not dest:
            problems.append("%s.signalDestination: missing; give the owner's Signal number" % where)
        if isinstance(sess, str) and isinstance(dest, str):
            out.append(Channel(sess, dest))
    return out


def _validate_values(cfg, problems):
    g = cfg.get
    for key in ("whatsapp.apiUrl", "whatsapp.mediaBaseUrl", "server.publicUrl"):
        if g(key):
            _check_url(key, g(key), problems)
    rpc, api = g("signal.rpcUrl"), g("signal.apiUrl")
    if bool(rpc) == bool(api):
        problems.append("signal: set exactly one of signal.rpcUrl (signal-cli daemon) or signal.apiUrl "
                        "(signal-cli-rest-api)")
    for key in ("signal.rpcUrl", "signal.apiUrl"):
        if g(key):
            _check_url(key, g(key), problems)
    if g("signal.number") and not E164.match(g("signal.number")):
        problems.append("signal.number: %s is not an E.164 number; write it like +15550000001"
                        % mask_phone(g("signal.number")))
    for i, ch in enumerate(cfg.channels):
        where = "signal.destination" if cfg.implicit_channel else "channels[%d].signalDestination" % i
        if not E164.match(ch.destination):
            problems.append("%s: %s is not an E.164 number; write it like +15550000002"
                            % (where, mask_phone(ch.destination)))
        if ch.destination == g("signal.number"):
            problems.append("%s: the owner cannot be the bridge's own number; "
                            "use the owner's personal Signal number" % where)
        first = next(j for j, c in enumerate(cfg.channels) if c.destination == ch.destination)
        if first < i:      # envelopes are routed by their sender: only one channel could ever be answered
            problems.append("%s: %s is already channels[%d]'s owner, and one owner number can have only one channel; "
                            "give each channel its own Signal number, or remove this one"
                            % (where, mask_phone(ch.destination), first))
    secret = g("whatsapp.webhookSecret")
    if not secret and any(p.startswith("whatsapp.webhookSecret:") for p in problems):
        pass   # already reported: the env variable it names is missing
    elif not secret:
        problems.append("whatsapp.webhookSecret: missing; set WEBHOOK_SECRET (openssl rand -base64 32) "
                        "and the same key in WAHA's webhook hmac")
    elif len(secret) < 32:
        problems.append("whatsapp.webhookSecret: only %d characters; use at least 32 (openssl rand -base64 32)"
                        % len(secret))
    if cfg.encryption and len(cfg.encryption_secret or "") < 32:
        problems.append("WHATSIGNAL_ENCRYPTION_SECRET: %s; set at least 32 characters (openssl rand -base64 32) "
                        "or WHATSIGNAL_ENABLE_ENCRYPTION=false"
                        % ("not set" if not cfg.encryption_secret else "only %d characters" % len(cfg.encryption_secret)))
    if not 0 <= g("server.port") < 65536:
        problems.append("server.port: %d is out of range; use 1-65535 (0 picks a free port)" % g("server.port"))
    for key, lo, hi in (("server.maxBodyMB", 1, 1024), ("media.maxSizeMB", 1, 2048), ("retentionDays", 1, 36500),
                        ("server.maxConnections", 4, 10000)):
        if not lo <= g(key) <= hi:
            problems.append("%s: %s is out of range; use %d-%d" % (key, g(key), lo, hi))
    if g("media.retentionDays") is not None and g("media.retentionDays") < 1:
        problems.append("media.retentionDays: must be at least 1")
    if not 0.5 <= g("server.requestTimeoutSeconds") <= 600:
        problems.append("server.requestTimeoutSeconds: %s is out of range; use 0.5-600" % g("server.requestTimeoutSeconds"))
    if not all(isinstance(x, str) and x.strip() for x in g("bridge.ignoreChats")):
        problems.append("bridge.ignoreChats: must be a list of chat ids (+number, …@c.us, …@g.us) or names")
    if g("bridge.catchUpHours") < 0 or not 1 <= g("bridge.catchUpMaxChats") <= 1000 \
            or not 1 <= g("bridge.catchUpMaxMessages") <= 1000:
        problems.append("bridge.catchUpHours must be >= 0 (0 turns catch-up off); bridge.catchUpMaxChats and "
                        "bridge.catchUpMaxMessages 1-1000")
    if g("cleanupIntervalHours") <= 0 or g("bridge.expireAfterHours") <= 0 or g("signal.pollIntervalSeconds") <= 0:
        problems.append("cleanupIntervalHours, bridge.expireAfterHours and signal.pollIntervalSeconds must be > 0")
    if g("logLevel") not in LEVELS:
        problems.append("logLevel: %r is not one of debug, info, warn, error" % g("logLevel"))
    if g("bridge.layout") not in ("inbox", "groups"):
        problems.append("bridge.layout: %r is not inbox or groups" % g("bridge.layout"))
    if g("database.synchronous").upper() not in ("NORMAL", "FULL"):
        problems.append("database.synchronous: use NORMAL or FULL")


class Config:
    """The validated configuration: ``get("whatsapp.apiUrl")``, ``channels``, encryption settings."""

    def __init__(self, values, environ):
        self.values = values
        self.channels = []
        flag = environ.get("WHATSIGNAL_ENABLE_ENCRYPTION", "true").strip().lower()
        self.encryption = flag not in ("false", "0", "no", "off")
        self.encryption_secret = environ.get("WHATSIGNAL_ENCRYPTION_SECRET")
        self.old_secret = environ.get("WHATSIGNAL_ENCRYPTION_SECRET_OLD")

    def get(self, path):
        return self.values[path]

    def channel(self, session):
        return next((c for c in self.channels if c.session == session), None)

    def masked(self):
        """Return the resolved configuration as a nested dict, secrets and numbers masked."""
        tree = {}
        for path, value in sorted(self.values.items()):
            if path in SECRET_KEYS and value:
                value = "***(%d chars)" % len(value)
            elif path in ("signal.destination", "signal.number") and value:
                value = mask_phone(value)
            node = tree
            parts = path.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        tree["channels"] = [{"whatsappSession": c.session, "signalDestination": mask_phone(c.destination)}
                            for c in self.channels]
        tree["encryption"] = {"enabled": self.encryption,
                              "secret": "***(%d chars)" % len(self.encryption_secret or "") if self.encryption else None}
        return tree

###############################################################################
# Pure helpers ################################################################
###############################################################################


def mask_phone(value):
    """Return *value* with the middle digits hidden: ``+4915******89``."""
    if not isinstance(value, str) or not value:
        return "?"
    head, at, domain = value.partition("@")
    digits = head.lstrip("+")
    if len(digits) <= 4:
        masked = "*" * len(digits)
    else:
        keep = 4 if len(digits) > 8 else 2
        masked = digits[:keep] + "*" * (len(digits) - keep - 2) + digits[-2:]
    return ("+" if head.startswith("+") else "") + masked + (at + domain if at else "")


def normalize_jid(jid):
    """Return the canonical chat id for *jid*: ``@s.whatsapp.net`` becomes ``@c.us``, devices dropped."""
    if not isinstance(jid, str) or "@" not in jid:
        return None
    user, _, server = jid.strip().partition("@")
    user = user.split(":", 1)[0]
    server = server.lower()
    if server == "s.whatsapp.net":
        server = "c.us"
    if not user or server not in ("c.us", "g.us", "lid", "newsletter", "broadcast"):
        return None
    return user + "@" + server


def msg_id_parts(msg_id):
    """Split a serialized WAHA message id into (fromMe, chat, bare id, participant) or None."""
    if isinstance(msg_id, dict):
        msg_id = msg_id.get("_serialized")
    if not isinstance(msg_id, str):
        return None
    parts = msg_id.split("_")
    if len(parts) in (3, 4) and parts[0] in ("true", "false") and "@" in parts[1] and parts[2]:
        return parts[0] == "true", parts[1], parts[2], (parts[3] if len(parts) == 4 else None)
    return None


def bare_msg_id(msg_id):
    """Return the bare WhatsApp id of a serialized or bare id."""
    parts = msg_id_parts(msg_id)
    if parts:
        return parts[2]
    return msg_id if isinstance(msg_id, str) and msg_id and len(msg_id) <= 128 else None


def _bare_id_of(msg_id, where):
    """The bare id of a payload's message id; PayloadError when it has none (e.g. over 128 characters, unserialized)."""
    bare = bare_msg_id(msg_id)
    if not bare:
        raise PayloadError("%s must be a message id (serialized, or at most 128 characters)" % where)
    return bare


def jid_to_phone(jid):
    """Return ``+<digits>`` for a ``<digits>@c.us`` id, else None."""
    j = normalize_jid(jid)
    if j and j.endswith("@c.us") and j[:-5].isdigit():
        return "+" + j[:-5]
    return None


def phone_to_jid(number):
    """Return the WhatsApp chat id for an E.164 number."""
    return number.lstrip("+") + "@c.us" if isinstance(number, str) and E164.match(number) else None


def verify_waha_signature(secret, body, signature, algorithm):
    """True when *signature* is WAHA's hex HMAC-SHA512 of the exact *body* bytes."""
    if not secret or not signature or (algorithm or "sha512").lower() != "sha512":
        return False
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha512).hexdigest().encode()
    return hmac.compare_digest(expected, signature.strip().lower().encode("utf-8", "replace"))


def next_backoff(attempt, start=BACKOFF_START, factor=BACKOFF_FACTOR, cap=BACKOFF_CAP, rand=random.random):
    """Seconds to wait before try number *attempt* + 1: capped exponential with jitter."""
    base = min(cap, start * factor ** min(attempt, 64))
    return base * (0.5 + rand() / 2)


class TokenBucket:
    """*burst* actions at once, then *rate* per second; ``take`` returns 0 or the seconds to wait."""

    def __init__(self, burst, rate, clock=time.monotonic):
        self.burst, self.rate, self.clock = burst, rate, clock
        self.tokens, self.at = float(burst), None
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            now = self.clock()
            if self.at is not None:
                self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate if self.rate > 0 else 3600.0


def shorten(text, limit=QUOTE_PREVIEW):
    """Return *text* on one line, cut to *limit* characters with an ellipsis."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def human_size(n):
    """Return ``83 MB`` style sizes for notices."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "bytes" else ("%.0f %s" % (n, unit))
        n /= 1024.0
    return "?"  # pragma: no cover


def iso_now(clock=time.time):
    return datetime.datetime.fromtimestamp(clock(), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_minute(ts):
    """Unix time *ts* as the owner reads it in bridge messages: ``2026-12-01 17:30 UTC``."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


MAGIC = (  # (family, prefix test) for the media types we bridge
    ("image/jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("image/png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("image/gif", lambda b: b[:4] == b"GIF8"),
    ("image/webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("video/mp4", lambda b: b[4:8] == b"ftyp"),
    ("audio/ogg", lambda b: b[:4] == b"OggS"),
    ("audio/mpeg", lambda b: b[:3] == b"ID3" or b[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")),
    ("audio/aac", lambda b: b[:2] in (b"\xff\xf1", b"\xff\xf9")),
    ("video/webm", lambda b: b[:4] == b"\x1a\x45\xdf\xa3"),
    ("application/pdf", lambda b: b[:5] == b"%PDF-"),
)


def sniff_mime(head):
    """Return the MIME type the first bytes *head* prove, or None."""
    for mime, test in MAGIC:
        if test(head):
            return mime
    return None


def media_type_ok(declared, head):
    """True when *head* fits the *declared* MIME family (images must be images, ...)."""
    family = (declared or "application/octet-stream").split("/")[0].lower()
    sniffed = sniff_mime(head) or ""
    if family == "image":
        return sniffed.startswith("image/")
    if family in ("video", "audio"):   # MP4/M4A share 'ftyp', Ogg/WebM hold both
        return sniffed.startswith(("video/", "audio/"))
    return head[:2] != b"MZ" and head[:4] != b"\x7fELF"   # documents: anything but executables


EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp",
              "video/mp4": ".mp4", "audio/ogg": ".ogg", "audio/mpeg": ".mp3", "audio/aac": ".aac",
              "audio/mp4": ".m4a", "application/pdf": ".pdf", "video/webm": ".webm"}


def safe_filename(name, mime):
    """Return a display file name with no path parts, control characters or dots in front.

    Other characters stay: each transport encodes the name as its upstream needs.
    """
    name = os.path.basename(str(name or "").replace("\\", "/"))
    name = re.sub(r"[\x00-\x1f\x7f/]", "_", name).lstrip(".")[:100]
    return name or ("file" + EXTENSIONS.get((mime or "").split(";")[0].strip().lower(), ".bin"))


###############################################################################
# Encryption ##################################################################
###############################################################################


class NoncePool:
    """Random bytes for nonces, read from ``os.urandom`` 4 KiB at a time; each byte is handed out once.

    ``os.urandom`` lets go of the interpreter lock for its getrandom(2) call, so with webhooks arriving on
    several threads every sealed value cost a hand-off of the lock to another thread and a wait to get it
    back; from the pool that is one call per 256 nonces.  Nonces are stored beside their ciphertext, so
    holding a few of them ahead is no secret kept.  A forked child starts with an empty pool.
    """

    def __init__(self, size=4096):
        self.size = size
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self.lock, self.buf, self.pos = threading.Lock(), b"", 0

    def __call__(self, n):
        with self.lock:
            if self.pos + n > len(self.buf):
                self.buf, self.pos = os.urandom(max(self.size, n)), 0
            out = self.buf[self.pos:self.pos + n]
            self.pos += n
        return out


NONCES = NoncePool()


class Cipher:
    """Authenticated encryption from the standard library alone.

    Keys: scrypt(secret, per-database random salt) gives a 64-byte master key;
    HMAC-SHA256(master, label) derives separate keys for encryption,
    authentication and lookup tokens.

    Value format (version 2): ``02 || nonce(16) || ciphertext || tag(32)``.
    The keystream is keyed BLAKE2b(key=enc, nonce || counter) in counter mode,
    64 bytes a block; the tag is HMAC-SHA256(mac, version || nonce ||
    len(aad) (4 bytes) || aad || ciphertext), checked in constant time before
    anything is decrypted.  *aad* (associated data, see ``seal_context``)
    names where the value belongs: table, column and the row's stable key, so a
    value copied to another row or column fails authentication.  Version 1
    (the same without aad) is opened only by ``decrypt_legacy``, when a
    database from before version 2 is re-sealed or rotated.  Version 0
    (``00 || plaintext``) is written only when encryption is explicitly
    disabled.  Lookup tokens are HMAC-SHA256(lookup, domain || 0 || value),
    hex, so rows are found by value without storing the value.
    """

    VERSION = 2
    LEGACY = 1
    NONCE = 16
    TAG = 32

    def __init__(self, secret, salt, enabled=True, rand=NONCES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P):
        self.enabled = enabled
        self.rand = rand
        if enabled:
            master = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                                    maxmem=256 * 1024 * 1024, dklen=64)
        else:
            master = hashlib.sha256(b"whatsignal-plaintext" + salt).digest()
        sub = lambda label: hmac.new(master, b"whatsignal/v1/" + label, hashlib.sha256).digest()
        self.enc_key, self.mac_key, self.lookup_key = sub(b"enc"), sub(b"mac"), sub(b"lookup")

    def _keystream(self, nonce, length):
        out = bytearray()
        for counter in range((length + 63) // 64):
            out += hashlib.blake2b(nonce + counter.to_bytes(8, "big"), key=self.enc_key).digest()
        return bytes(out[:length])

    def _xor(self, data, nonce):
        if not data:
            return b""
        ks = self._keystream(nonce, len(data))
        return (int.from_bytes(data, "big") ^ int.from_bytes(ks, "big")).to_bytes(len(data), "big")

    def _tag(self, head, aad, ct):
        if head[0] == self.LEGACY:
            return hmac.new(self.mac_key, head + ct, hashlib.sha256).digest()
        return hmac.new(self.mac_key, head + struct.pack(">I", len(aad)) + aad + ct, hashlib.sha256).digest()

    def encrypt(self, value, aad):
        """Return the sealed bytes of *value* (str or bytes) bound to *aad* (bytes); None stays None."""
        if value is None:
            return None
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        if not self.enabled:
            return b"\x00" + data
        nonce = self.rand(self.NONCE)
        head = bytes([self.VERSION]) + nonce
        ct = self._xor(data, nonce)
        return head + ct + self._tag(head, bytes(aad), ct)

    def decrypt_bytes(self, blob, aad, legacy=False):
        """The bytes sealed in *blob* for *aad*; CryptoError if altered or sealed for another place.

        *legacy* also accepts version 1 values (no aad): only for re-sealing and rotation.
        """
        if blob is None:
            return None
        blob = bytes(blob)
        if blob[:1] == b"\x00" and not self.enabled:
            return blob[1:]
        versions = (self.VERSION, self.LEGACY) if legacy else (self.VERSION,)
        if len(blob) < 1 + self.NONCE + self.TAG or blob[0] not in versions:
            raise CryptoError("stored value has an unknown format or was written with encryption %s"
                              % ("disabled" if blob[:1] == b"\x00" else "enabled"))
        head, ct, tag = blob[:1 + self.NONCE], blob[1 + self.NONCE:-self.TAG], blob[-self.TAG:]
        if not hmac.compare_digest(self._tag(head, bytes(aad), ct), tag):
            raise CryptoError("stored value failed authentication (tampered, moved from another row or column, "
                              "or another key)")
        return self._xor(ct, head[1:])

    def decrypt_legacy(self, blob, aad):
        """Like decrypt_bytes, also accepting version 1 (unbound) values: for migration and rotation only."""
        return self.decrypt_bytes(blob, aad, legacy=True)

    def decrypt(self, blob, aad):
        """Return the str sealed in *blob* for *aad*; raise CryptoError if it was altered or moved."""
        data = self.decrypt_bytes(blob, aad)
        return None if data is None else data.decode("utf-8", "surrogatepass")

    def token(self, domain, value):
        """Return the keyed lookup token for *value* in *domain* (hex, 32 chars)."""
        if value is None:
            return None
        msg = domain.encode() + b"\x00" + str(value).encode("utf-8", "surrogatepass")
        return hmac.new(self.lookup_key, msg, hashlib.sha256).hexdigest()[:32]

    def key_check(self):
        """Return the key check value stored in the database to recognise this key."""
        tag = hmac.new(self.mac_key, b"whatsignal key check", hashlib.sha256).hexdigest()[:24]
        return ("enc1:" if self.enabled else "plain:") + tag


def seal_context(table, column, *key):
    """The associated data of a sealed value: its table, its column and its row's stable key.

    Each part is length-prefixed (2 bytes), so no two different places share associated data.
    """
    parts = [str(p).encode("utf-8", "surrogatepass") for p in (table, column) + key]
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


###############################################################################
# Translation #################################################################
###############################################################################
# Pure functions over dicts: WAHA event -> compact record -> Signal text, and
# Signal envelope -> compact record.  No I/O, no clock.

Inbound = collections.namedtuple("Inbound", "kind session dedupe chat record")
Inbound.__doc__ = "A validated upstream event: what to store, how to dedupe it, which chat orders it."


def _opt(obj, key, kinds, where):
    """Return obj[key] if it has one of *kinds* (or is missing/None), else raise PayloadError."""
    v = obj.get(key)
    if v is None or isinstance(v, kinds) and not isinstance(v, bool) or (bool in kinds and isinstance(v, bool)):
        return v
    raise PayloadError("%s.%s has the wrong type" % (where, key))


def _obj(obj, key, where):
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise PayloadError("%s.%s must be an object" % (where, key))
    return v


def _chat_of(payload, msg_id=None):
    parts = msg_id_parts(msg_id if msg_id is not None else payload.get("id"))
    chat = normalize_jid(parts[1]) if parts else None
    return chat or normalize_jid(payload.get("from")) if isinstance(payload.get("from"), (str, type(None))) else chat


def _jid_of(v):
    """A chat id given as a string or as whatsapp-web.js's ``{_serialized}`` object, normalized."""
    if isinstance(v, dict):
        v = v.get("_serialized")
    return normalize_jid(v) if isinstance(v, str) else None


def _sender_of(payload, msg_id, chat):
    """The author of a message in *chat*, read the way each engine gives it (waha.md 4.1).

    NOWEB and GOWS set ``participant``; WEBJS has the sender only in ``_data.author``; the raw
    engine objects (GOWS ``Info.Sender``, NOWEB ``key.participant``) and a group id's fourth part
    are fallbacks.  A 1:1 chat's author is the chat.
    """
    found = normalize_jid(_opt(payload, "participant", (str,), "payload")) or \
        normalize_jid(_opt(payload, "author", (str,), "payload"))
    if found or not chat.endswith("@g.us"):
        return found or chat
    data = payload.get("_data") if isinstance(payload.get("_data"), dict) else {}
    info = data.get("Info") if isinstance(data.get("Info"), dict) else {}
    key = data.get("key") if isinstance(data.get("key"), dict) else {}
    parts = msg_id_parts(msg_id)
    for v in (data.get("author"), info.get("Sender"), key.get("participant"), parts[3] if parts else None):
        j = _jid_of(v)
        if j and j != chat:
            return j
    return chat


def clean_name(value):
    """A name on one line, at most 100 characters, or None."""
    return " ".join(value.split())[:100] or None if isinstance(value, str) else None


def _push_name(payload):
    data = payload.get("_data")
    if isinstance(data, dict):
        for v in (data.get("notifyName"), data.get("pushName"),
                  data.get("Info", {}).get("PushName") if isinstance(data.get("Info"), dict) else None):
            if clean_name(v):
                return clean_name(v)
    return None


def _reply_of(payload):
    r = payload.get("replyTo")
    if r is None:
        return None
    if isinstance(r, str):       # one docs version sent the id as a plain string
        return {"id": bare_msg_id(r), "body": None, "participant": None}
    if not isinstance(r, dict):
        raise PayloadError("payload.replyTo must be an object or a string")
    return {"id": bare_msg_id(r.get("id")) if isinstance(r.get("id"), str) else None,
            "body": _opt(r, "body", (str,), "replyTo"),
            "participant": normalize_jid(_opt(r, "participant", (str,), "replyTo"))}


def _media_of(payload):
    m = payload.get("media")
    if not isinstance(m, dict):
        if m is not None:
            raise PayloadError("payload.media must be an object")
        return None
    return {"url": _opt(m, "url", (str,), "media"), "mimetype": _opt(m, "mimetype", (str,), "media"),
            "filename": _opt(m, "filename", (str,), "media"),
            "error": None if m.get("error") is None else str(m.get("error"))[:200]}


def _location_of(payload):
    loc = payload.get("location")
    if not isinstance(loc, dict):
        return None
    try:
        lat, lon = float(loc.get("latitude")), float(loc.get("longitude"))
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    name = loc.get("name") if isinstance(loc.get("name"), str) else None
    addr = loc.get("address") if isinstance(loc.get("address"), str) else None
    return {"lat": lat, "lon": lon, "name": name, "address": addr}


def parse_waha_event(event):
    """Validate a decoded WAHA webhook; return an Inbound, or None for events not bridged.

    Raises PayloadError for a payload of the wrong shape.
    """
    if not isinstance(event, dict):
        raise PayloadError("the webhook body must be a JSON object")
    name, session = event.get("event"), event.get("session")
    if not isinstance(name, str) or not isinstance(session, str) or not session or len(session) > 100:
        raise PayloadError("event and session must be strings")
    if name not in WAHA_EVENTS:
        return None
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise PayloadError("payload must be an object")
    handler = globals()["_parse_" + name.replace(".", "_")]
    inbound = handler(payload, event)
    if inbound is None:
        return None
    kind, dedupe, chat, record = inbound
    record["event"] = kind
    return Inbound(kind, session, dedupe, chat, record)


def _message_id(payload):
    msg_id = payload.get("id")
    if isinstance(msg_id, dict):
        msg_id = msg_id.get("_serialized")
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 300:
        raise PayloadError("payload.id must be a message id")
    return msg_id


def _parse_message(payload, event):
    msg_id = _message_id(payload)
    if _opt(payload, "fromMe", (bool,), "payload"):
        return None               # `message` never carries the owner's own: `message.any` does
    return _message_of(payload, msg_id, "message")


def _parse_message_any(payload, event):
    """Every message, the owner's own too.  Someone else's is the same item as its `message` event
    (same dedupe key, so subscribing to both delivers it once); the owner's own, typed on the phone or a
    linked device, becomes `message.own`; one sent through WAHA's API (``source: "api"``: the bridge's
    own sends) is never echoed back."""
    msg_id = _message_id(payload)
    if not _opt(payload, "fromMe", (bool,), "payload"):
        return _message_of(payload, msg_id, "message")
    if payload.get("source") == "api":
        return None
    parsed = _message_of(payload, msg_id, "message.own")
    if parsed:
        parsed[3]["source"] = payload.get("source") if payload.get("source") in ("app", "api") else None
    return parsed


def _message_of(payload, msg_id, kind):
    chat = _chat_of(payload, msg_id)
    if not chat:
        raise PayloadError("message has no chat id")
    if chat.endswith(("@broadcast", "@newsletter")):
        return None
    body = _opt(payload, "body", (str,), "payload")
    rec = {"id": msg_id, "bare": _bare_id_of(msg_id, "payload.id"), "chat": chat,
           "sender": _sender_of(payload, msg_id, chat), "push": _push_name(payload), "body": body or "",
           "media": _media_of(payload) if payload.get("hasMedia") or payload.get("media") else None,
           "location": _location_of(payload), "reply": _reply_of(payload)}
    vcards = payload.get("vCards")
    rec["vcards"] = [v for v in vcards if isinstance(v, str)][:10] if isinstance(vcards, list) else []
    rec["mentions"] = _mentions_of(payload)
    rec["poll"] = _poll_of(payload)
    if rec["poll"] and not rec["body"]:
        rec["body"] = "📊 " + rec["poll"]["name"] + "".join(
            "\n%d. %s" % (i + 1, o) for i, o in enumerate(rec["poll"]["options"])) + "\n(quote with a number to vote)"
    rec["view_once"] = _view_once_of(payload)
    if rec["view_once"]:                 # WhatsApp shows it once, on the phone: no copy, not even a broken one
        rec.update(body="", media=None)
        return kind, "m:" + rec["bare"], chat, rec
    if not (rec["body"] or rec["media"] or rec["location"] or rec["vcards"] or payload.get("hasMedia") is True):
        return None                      # empty system message
    if payload.get("hasMedia") is True and not rec["media"]:
        rec["media"] = {"url": None, "mimetype": None, "filename": None, "error": "not downloaded by WAHA"}
    # the bare id alone: the same message may arrive under its @lid and its phone-number chat id
    return kind, "m:" + rec["bare"], chat, rec


VIEW_ONCE_KINDS = {"imageMessage": "photo", "videoMessage": "video", "audioMessage": "voice message",
                   "image": "photo", "video": "video", "ptt": "voice message", "audio": "voice message"}


def _content_of(data):
    """The engine's message content in ``_data``: GOWS ``Message``, NOWEB ``message``; {} when neither."""
    msg = data.get("Message") if isinstance(data.get("Message"), dict) else data.get("message")
    return msg if isinstance(msg, dict) else {}


def _view_once_of(payload):
    """'photo', 'video' or 'voice message' for view-once media, else None.

    WEBJS: ``_data.isViewOnce`` and ``_data.type``.  GOWS: whatsmeow's ``IsViewOnce*`` flags beside the
    unwrapped ``Message``; NOWEB: ``message.viewOnceMessage*.message``; both: ``<media>Message.viewOnce``.
    """
    data = payload.get("_data")
    if not isinstance(data, dict):
        return None
    if data.get("isViewOnce") is True:
        return VIEW_ONCE_KINDS.get(data["type"], "media") if isinstance(data.get("type"), str) else "media"
    msg = _content_of(data)
    flagged = any(data.get(k) is True for k in ("IsViewOnce", "IsViewOnceV2", "IsViewOnceV2Extension"))
    for wrapper in ("viewOnceMessage", "viewOnceMessageV2", "viewOnceMessageV2Extension"):
        inner = msg.get(wrapper)
        if isinstance(inner, dict) and isinstance(inner.get("message"), dict):
            msg, flagged = inner["message"], True
    for key, kind in VIEW_ONCE_KINDS.items():
        content = msg.get(key)
        if isinstance(content, dict) and (flagged or content.get("viewOnce") is True):
            return kind
    return "media" if flagged else None


def _mentions_of(payload):
    """The ids a message mentions: WEBJS ``_data.mentionedJidList``; GOWS/NOWEB ``contextInfo.mentionedJID``
    (``mentionedJid`` in Baileys) of the message content in ``_data.Message`` / ``_data.message``."""
    data = payload.get("_data")
    if not isinstance(data, dict):
        return []
    found = data.get("mentionedJidList") if isinstance(data.get("mentionedJidList"), list) else []
    msg = _content_of(data)
    for content in msg.values():
        ctx = content.get("contextInfo") if isinstance(content, dict) else None
        if isinstance(ctx, dict):
            for key in ("mentionedJID", "mentionedJid"):
                if isinstance(ctx.get(key), list):
                    found = found + ctx[key]
    out = []
    for j in found[:50]:
        j = _jid_of(j)
        if j and j not in out:
            out.append(j)
    return out


def _poll_of(payload):
    """A poll's question and options {name, options, multi} from ``_data``, else None.

    GOWS (``Message``) and NOWEB (``message``): ``pollCreationMessage[V2|V3] {name, options: [{optionName}],
    selectableOptionsCount}``; WEBJS: ``type: "poll_creation"``, ``pollName``, ``pollOptions: [{name}]``.
    """
    data = payload.get("_data")
    if not isinstance(data, dict):
        return None
    if data.get("type") == "poll_creation" and isinstance(data.get("pollName"), str):
        name, opts, count = data["pollName"], data.get("pollOptions"), data.get("pollSelectableOptionsCount")
        key = "name"
    else:
        msg = _content_of(data)
        poll = next((msg[k] for k in ("pollCreationMessageV3", "pollCreationMessageV2", "pollCreationMessage")
                     if isinstance(msg.get(k), dict)), None)
        if poll is None or not isinstance(poll.get("name"), str):
            return None
        name, opts, count, key = poll["name"], poll.get("options"), poll.get("selectableOptionsCount"), "optionName"
    opts = [o[key].strip()[:100] for o in opts if isinstance(o, dict) and isinstance(o.get(key), str)] \
        if isinstance(opts, list) else []
    if not opts:
        return None
    return {"name": name.strip()[:300], "options": opts[:12], "multi": count not in (None, 1)}


def _parse_poll_vote(payload, event):
    """poll.vote: {vote: {id, selectedOptions, from, participant, fromMe, ...}, poll: {id, ...}} (ids serialized)."""
    vote, poll = _obj(payload, "vote", "payload"), _obj(payload, "poll", "payload")
    vparts, pparts = msg_id_parts(vote.get("id")), msg_id_parts(poll.get("id"))
    chosen = vote.get("selectedOptions")
    if not vparts or not pparts or not isinstance(chosen, list):
        raise PayloadError("poll.vote needs vote.id, vote.selectedOptions and poll.id")
    if vote.get("fromMe") is True:
        return None
    chat = normalize_jid(vparts[1])
    if not chat or chat.endswith(("@broadcast", "@newsletter")):
        return None
    voter = normalize_jid(vote.get("participant") if isinstance(vote.get("participant"), str) else None) or \
        normalize_jid(vote.get("from") if isinstance(vote.get("from"), str) else None) or chat
    rec = {"chat": chat, "poll_bare": pparts[2], "sender": voter,
           "options": [str(o)[:100] for o in chosen if isinstance(o, str)][:12]}
    return "poll.vote", "v:%s:%s" % (vparts[2], voter), chat, rec


def _parse_call(payload, event):
    """call.received / call.accepted / call.rejected: CallData {id, from, timestamp, isVideo, isGroup}."""
    call_id = _opt(payload, "id", (str,), "payload")
    caller = normalize_jid(_opt(payload, "from", (str,), "payload"))
    if not call_id or not caller:
        raise PayloadError("a call event needs payload.id and payload.from")
    if caller.endswith(("@broadcast", "@newsletter")):
        return None
    kind = event["event"]
    rec = {"chat": caller, "call": call_id[:100], "video": payload.get("isVideo") is True}
    return kind, "c:%s:%s" % (call_id[:100], kind), caller, rec


_parse_call_received = _parse_call_accepted = _parse_call_rejected = _parse_call


def _parse_message_reaction(payload, event):
    reaction = _obj(payload, "reaction", "payload")
    target = reaction.get("messageId")
    text = _opt(reaction, "text", (str,), "reaction")
    parts = msg_id_parts(target)
    if not parts or text is None:
        raise PayloadError("reaction needs reaction.messageId (serialized) and reaction.text")
    if _opt(payload, "fromMe", (bool,), "payload"):
        return None
    ts = payload.get("timestamp") if isinstance(payload.get("timestamp"), (int, float)) else None
    # NOWEB and GOWS build reaction.messageId from the reaction's own key, whose chat is the chat as the
    # reactor sees it (the owner's own id in a 1:1 chat); their `from` is the chat.  WEBJS builds it from
    # the owner's side, and its `from` is the reactor.
    own = normalize_jid(payload.get("from")) if isinstance(payload.get("from"), str) else None
    chat = normalize_jid(parts[1]) if event.get("engine") == "WEBJS" or not own else own
    if not chat:
        raise PayloadError("reaction target has no chat id")
    rec = {"chat": chat, "target": target, "target_bare": parts[2], "emoji": text[:32],
           "sender": normalize_jid(payload.get("participant") if isinstance(payload.get("participant"), str) else None)
           or normalize_jid(payload.get("from") if isinstance(payload.get("from"), str) else None) or chat}
    # WEBJS gives a reaction the id of its target: key on target, reactor, time and emoji instead
    return "message.reaction", "r:%s:%s:%r:%s" % (parts[2], rec["sender"], ts, text[:32]), chat, rec


def _parse_message_edited(payload, event):
    target = _opt(payload, "editedMessageId", (str,), "payload")
    if not target:
        raise PayloadError("message.edited needs editedMessageId")
    if _opt(payload, "fromMe", (bool,), "payload"):
        return None
    chat = _chat_of(payload)
    if not chat:
        raise PayloadError("edit has no chat id")
    body = _opt(payload, "body", (str,), "payload") or ""
    eid = payload.get("id") if isinstance(payload.get("id"), str) else ""
    ts = payload.get("timestamp") if isinstance(payload.get("timestamp"), (int, float)) else None
    rec = {"chat": chat, "target_bare": _bare_id_of(target, "editedMessageId"), "body": body,
           "sender": _sender_of(payload, eid, chat), "push": _push_name(payload)}
    digest = hashlib.sha256(body.encode("utf-8", "replace")).hexdigest()[:16]
    return "message.edited", "e:%s:%s:%r:%s" % (rec["target_bare"], eid[:200], ts, digest), chat, rec


def _parse_message_revoked(payload, event):
    target = _opt(payload, "revokedMessageId", (str,), "payload")
    after = payload.get("after") if isinstance(payload.get("after"), dict) else {}
    before = payload.get("before") if isinstance(payload.get("before"), dict) else {}
    if not target:
        target = bare_msg_id(before.get("id")) if isinstance(before.get("id"), str) else None
    if not target and event.get("engine") == "WEBJS":   # WEBJS: `after` is the revoked message itself
        target = bare_msg_id(after.get("id")) if isinstance(after.get("id"), str) else None
    chat = _chat_of(after) if after else None
    chat = chat or (_chat_of(before) if before else None)
    if not target or not chat:
        raise PayloadError("message.revoked needs revokedMessageId and a chat")
    if after.get("fromMe") is True:
        return None
    bare = _bare_id_of(target, "revokedMessageId")
    return "message.revoked", "d:%s:%s" % (chat, bare), chat, {"chat": chat, "target_bare": bare}


def _parse_message_ack(payload, event):
    parts = msg_id_parts(payload.get("id"))
    ack = payload.get("ack")
    if not parts or not isinstance(ack, int) or isinstance(ack, bool) or not -1 <= ack <= 4:
        raise PayloadError("message.ack needs a serialized id and an ack from -1 to 4")
    chat = normalize_jid(parts[1])
    if not chat:
        raise PayloadError("ack has no chat id")
    return "message.ack", "a:%s:%s:%d" % (chat, parts[2], ack), chat, {"chat": chat, "bare": parts[2], "ack": ack}


_parse_message_ack_group = _parse_message_ack


def _parse_session_status(payload, event):
    status = _opt(payload, "status", (str,), "payload")
    if status not in SESSION_DOWN + ("WORKING", "STARTING"):
        raise PayloadError("session.status needs a known payload.status")
    eid = event.get("id") if isinstance(event.get("id"), str) else None
    ts = event.get("timestamp") if isinstance(event.get("timestamp"), (int, float)) else None
    dedupe = "s:" + (eid or "%s:%s" % (status, ts if ts is not None else secrets.token_hex(8)))
    return "session.status", dedupe[:300], "~session", {"status": status[:40]}


def event_time(event):
    """When WhatsApp says a webhook's event happened (Unix seconds), or None when it does not say.

    The payload's ``timestamp`` (seconds; WEBJS reactions fractional; ``after`` of a
    revoke), else the envelope's (milliseconds).  Both are inside the signed body.
    """
    payload = event.get("payload") if isinstance(event.get("payload"), dict) else {}
    if event.get("event") == "message.revoked":
        payload = next((p for p in (payload.get("after"), payload.get("before")) if isinstance(p, dict)), {})
    for value in (payload.get("timestamp"), event.get("timestamp")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e15:
            return value / 1000.0 if value > 1e11 else float(value)      # 1e11 s is the year 5138
    return None


def describe_location(loc):
    """Return a readable location with a maps link."""
    link = "https://maps.google.com/?q=%.6f,%.6f" % (loc["lat"], loc["lon"])
    label = ", ".join(x for x in (loc.get("name"), loc.get("address")) if x)
    return "📍 %s%s" % ((label + " ") if label else "", link)


def describe_vcard(card):
    """Return ``name, number`` from a vCard string."""
    name = re.search(r"^FN[^:]*:(.*)$", card, re.M)
    tel = re.search(r"^TEL[^:]*:(.*)$", card, re.M)
    return "👤 %s%s" % ((name.group(1).strip() if name else "contact"),
                       (", " + tel.group(1).strip()) if tel else "")


def render_for_signal(rec, sender_name, group_name=None, inline_quote=None, notice=None, prefix=True):
    """Return the Signal text for a WhatsApp message record.

    Format: ``Alice Example: text`` in a 1:1 chat, ``Alice Example in Family:
    text`` in a group; an unknown quoted message is shown first as ``> quote``;
    a media problem as ``[video, 83 MB, over the 50 MB limit]``.
    """
    lines = []
    if inline_quote:
        lines.append("> " + shorten(inline_quote))
    parts = [p for p in (notice and "[%s]" % notice, rec.get("body")) if p]
    if rec.get("location"):
        parts.append(describe_location(rec["location"]))
    parts.extend(describe_vcard(v) for v in rec.get("vcards") or [])
    text = " ".join(parts[:1]) + ("\n" + "\n".join(parts[1:]) if len(parts) > 1 else "")
    who = sender_name + (" in " + group_name if group_name else "")
    lines.append((who + ": " + text) if prefix else text)
    return "\n".join(lines).rstrip()


def catchup_header(rec):
    """The line that opens the first message a catch-up recovered in a chat, else ''."""
    n = rec.get("catchup")
    more = " (the newest; older ones are on your phone)" if rec.get("catchup_more") else ""
    return "%d message%s while the bridge was offline%s:\n" % (n, "" if n == 1 else "s", more) if n else ""


SignalIn = collections.namedtuple("SignalIn", "kind number uuid ts account fields device", defaults=(None,))
SignalIn.__doc__ = "A validated Signal envelope: who sent it (and from which device), when (ms), and what it is."


def _unwrap_receive(obj):
    if isinstance(obj, dict) and obj.get("method") == "receive" and isinstance(obj.get("params"), dict):
        obj = obj["params"]
        if isinstance(obj.get("result"), dict):
            obj = obj["result"]
    return obj


def _ts(v, where):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2 ** 53:
        raise PayloadError("%s must be a positive integer timestamp in ms" % where)
    return v


def _attachments_of(dm):
    atts = dm.get("attachments") or []
    if not isinstance(atts, list):
        raise PayloadError("attachments must be a list")
    out = []
    for a in atts[:32]:
        if not isinstance(a, dict) or not isinstance(a.get("id"), str):
            continue
        size = a.get("size") if isinstance(a.get("size"), int) and not isinstance(a.get("size"), bool) else None
        out.append({"id": a["id"][:200], "contentType": str(a.get("contentType") or "application/octet-stream")[:100],
                    "filename": a.get("filename") if isinstance(a.get("filename"), str) else None, "size": size})
    return out


def parse_signal_envelope(obj):
    """Validate one receive object from any signal-cli transport; return a SignalIn.

    Raises PayloadError when it has no usable envelope.
    """
    obj = _unwrap_receive(obj)
    if not isinstance(obj, dict):
        raise PayloadError("receive object must be a JSON object")
    env = obj.get("envelope")
    if not isinstance(env, dict):
        raise PayloadError("receive object without envelope" + (" (signal-cli exception)" if "exception" in obj else ""))
    number = env.get("sourceNumber") if isinstance(env.get("sourceNumber"), str) else None
    uuid = env.get("sourceUuid") if isinstance(env.get("sourceUuid"), str) else None
    if number is None and isinstance(env.get("source"), str) and env["source"].startswith("+"):
        number = env["source"]
    ts = _ts(env.get("timestamp"), "envelope.timestamp")
    account = obj.get("account") if isinstance(obj.get("account"), str) else None
    device = env.get("sourceDevice")
    device = device if isinstance(device, int) and not isinstance(device, bool) and 0 <= device < 2 ** 31 else None
    mk = lambda kind, **f: SignalIn(kind, number, uuid, ts, account, f, device)
    exc = obj.get("exception")
    if isinstance(exc, dict) and exc.get("type") == "UntrustedIdentityException":
        return mk("untrusted")       # signal-cli holds the message until the sender's key is trusted
    if "syncMessage" in env:
        return mk("sync")
    if isinstance(env.get("editMessage"), dict):
        em = env["editMessage"]
        dm = em.get("dataMessage") if isinstance(em.get("dataMessage"), dict) else {}
        return mk("edit", target_ts=_ts(em.get("targetSentTimestamp"), "editMessage.targetSentTimestamp"),
                  text=_opt(dm, "message", (str,), "dataMessage") or "")
    if isinstance(env.get("receiptMessage"), dict):
        rm = env["receiptMessage"]
        stamps = rm.get("timestamps") if isinstance(rm.get("timestamps"), list) else []
        stamps = [t for t in stamps if isinstance(t, int) and not isinstance(t, bool) and 0 < t < 2 ** 53][:100]
        return mk("receipt", read=rm.get("isRead") is True or rm.get("isViewed") is True, timestamps=stamps)
    if isinstance(env.get("typingMessage"), dict):
        tm = env["typingMessage"]
        return mk("typing", started=tm.get("action") == "STARTED",
                  group=tm.get("groupId") if isinstance(tm.get("groupId"), str) else None)
    dm = env.get("dataMessage")
    if not isinstance(dm, dict):
        return mk("other")
    gi = dm.get("groupInfo") if isinstance(dm.get("groupInfo"), dict) else {}
    group = gi.get("groupId") if isinstance(gi.get("groupId"), str) else None
    if isinstance(dm.get("reaction"), dict):
        r = dm["reaction"]
        return mk("reaction", emoji=str(r.get("emoji") or "")[:32], remove=r.get("isRemove") is True,
                  target_ts=_ts(r.get("targetSentTimestamp"), "reaction.targetSentTimestamp"), group=group)
    if isinstance(dm.get("remoteDelete"), dict):
        return mk("delete", target_ts=_ts(dm["remoteDelete"].get("timestamp"), "remoteDelete.timestamp"), group=group)
    if gi.get("type") == "UPDATE" and group:
        return mk("group-update", group=group)
    if dm.get("isExpirationUpdate") is True:
        return mk("other", group=group)
    text = _opt(dm, "message", (str,), "dataMessage") or ""
    quote = None
    if isinstance(dm.get("quote"), dict):
        q = dm["quote"]
        quote = {"id": _ts(q.get("id"), "quote.id"), "text": q.get("text") if isinstance(q.get("text"), str) else None}
    atts = _attachments_of(dm)
    if not text and not atts:
        return mk("other", group=group)
    return mk("message", text=text, quote=quote, attachments=atts, group=group)

###############################################################################
# Store #######################################################################
###############################################################################

SCHEMA = [
    # version 1
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- Everything received, in both directions, until it is delivered.
    CREATE TABLE IF NOT EXISTS queue (
        id INTEGER PRIMARY KEY,
        channel TEXT NOT NULL,           -- WAHA session of the channel
        direction TEXT NOT NULL,         -- w2s (WhatsApp -> Signal) | s2w
        dedupe TEXT NOT NULL,            -- lookup token of the upstream id
        chat TEXT NOT NULL,              -- lookup token of the chat: order is kept per chat
        kind TEXT NOT NULL,              -- WAHA event name or Signal envelope kind
        body BLOB NOT NULL,              -- sealed JSON record
        state TEXT NOT NULL DEFAULT 'pending',   -- pending | done | dead
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        error TEXT);
    CREATE UNIQUE INDEX IF NOT EXISTS queue_dedupe ON queue(direction, dedupe);
    CREATE INDEX IF NOT EXISTS queue_pending ON queue(direction, state, id);
    CREATE INDEX IF NOT EXISTS queue_age ON queue(state, updated_at);
    -- Every bridged message: its WhatsApp id and its Signal counterpart.
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        channel TEXT NOT NULL,
        direction TEXT NOT NULL,         -- w2s: WhatsApp original, Signal copy; s2w: the owner's message
        wa_chat TEXT NOT NULL,           -- lookup token of the chat id
        wa_chat_enc BLOB NOT NULL,       -- sealed chat id
        wa_msg TEXT,                     -- lookup token of the bare WhatsApp id
        wa_msg_enc BLOB,                 -- sealed serialized WhatsApp id
        sig_ts INTEGER,                  -- Signal sent-timestamp (ms) of the Signal side
        sig_author_enc BLOB,             -- sealed author of the Signal side
        ack INTEGER,                     -- WhatsApp ack of the owner's messages
        created_at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS messages_wa ON messages(channel, wa_msg);
    CREATE INDEX IF NOT EXISTS messages_sig ON messages(channel, sig_ts);
    CREATE INDEX IF NOT EXISTS messages_recent ON messages(channel, direction, id);
    CREATE INDEX IF NOT EXISTS messages_age ON messages(created_at);
    -- WhatsApp chats seen, for /chats, names and the groups layout.
    CREATE TABLE IF NOT EXISTS chats (
        channel TEXT NOT NULL,
        wa_chat TEXT NOT NULL,           -- lookup token
        wa_chat_enc BLOB NOT NULL,
        name_enc BLOB,                   -- sealed display name
        short INTEGER NOT NULL,          -- the short number /chats shows
        last_at REAL NOT NULL,
        name_at REAL NOT NULL DEFAULT 0, -- when the name was last looked up
        PRIMARY KEY (channel, wa_chat));
    CREATE INDEX IF NOT EXISTS chats_age ON chats(last_at);
    CREATE TABLE IF NOT EXISTS contacts (
        channel TEXT NOT NULL, jid TEXT NOT NULL, name_enc BLOB, updated_at REAL NOT NULL,
        PRIMARY KEY (channel, jid));
    CREATE TABLE IF NOT EXISTS lids (
        channel TEXT NOT NULL, lid TEXT NOT NULL, pn_enc BLOB, updated_at REAL NOT NULL,
        PRIMARY KEY (channel, lid));
    CREATE TABLE IF NOT EXISTS state (
        channel TEXT NOT NULL, key TEXT NOT NULL, value TEXT, updated_at REAL NOT NULL,
        PRIMARY KEY (channel, key));
    CREATE TABLE IF NOT EXISTS lease (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
    """,
    # version 2: the groups layout (one Signal group per WhatsApp chat)
    """
    CREATE TABLE IF NOT EXISTS signal_groups (
        channel TEXT NOT NULL,
        wa_chat TEXT NOT NULL,           -- lookup token of the WhatsApp chat
        wa_chat_enc BLOB NOT NULL,
        group_tok TEXT,                  -- lookup token of the Signal group id
        group_enc BLOB,                  -- sealed signal-cli group id (base64)
        name_enc BLOB,                   -- sealed group name as last set
        tag TEXT NOT NULL,               -- random tag in the group description: finds a group made before a crash
        state TEXT NOT NULL,             -- creating | active | left
        created_at REAL NOT NULL,
        renamed_at REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (channel, wa_chat));
    CREATE INDEX IF NOT EXISTS signal_groups_tok ON signal_groups(channel, group_tok);
    ALTER TABLE messages ADD COLUMN sig_conv_enc BLOB;   -- Signal group holding the copy (NULL: the owner's 1:1)
    """,
    # version 3: who wrote the WhatsApp original (lookup token), so only its author can edit the copy
    """
    ALTER TABLE messages ADD COLUMN wa_sender TEXT;
    """,
    # version 4: dedupe keys are unique per channel: WhatsApp gives a group message the same id for every
    # member, so two channels in one group receive it twice, once each.  The stored keys do not change
    # (they were unique over all channels, so they are unique per channel): nothing seen is seen anew.
    """
    DROP INDEX IF EXISTS queue_dedupe;
    CREATE UNIQUE INDEX IF NOT EXISTS queue_dedupe_channel ON queue(channel, direction, dedupe);
    """,
    # version 5: sealed values bound to their place (Cipher version 2, re-sealed by Store.unlock), the author
    # sealed beside its token so rotate-key can recompute it, sealed state values, and a fenced lease
    """
    ALTER TABLE messages ADD COLUMN wa_sender_enc BLOB;      -- sealed author of the WhatsApp original
    ALTER TABLE state ADD COLUMN value_enc BLOB;             -- sealed value of state that names someone
    ALTER TABLE lease ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;   -- +1 whenever another holder takes it
    ALTER TABLE lease ADD COLUMN beat INTEGER NOT NULL DEFAULT 0;         -- +1 at every renewal
    ALTER TABLE lease ADD COLUMN period REAL NOT NULL DEFAULT 0;          -- the holder's lease period (s)
    INSERT OR REPLACE INTO meta(key, value) VALUES ('reseal', 'pending');
    """,
    # version 6: the queue's two working indexes hold only the rows they serve (partial indexes): pending
    # items for delivery, ended ones for retention and the dead-letter list.  A new item is written to one
    # index page fewer, and the delivered items of years no longer sit in the index every new one goes into.
    # Queries on ended items name the ENDED condition, so SQLite can use queue_ended.
    """
    DROP INDEX IF EXISTS queue_pending;
    DROP INDEX IF EXISTS queue_age;
    CREATE INDEX IF NOT EXISTS queue_pending_only ON queue(direction, id) WHERE state='pending';
    CREATE INDEX IF NOT EXISTS queue_ended ON queue(state, updated_at) WHERE state IN ('done', 'dead', 'muted');
    """,
]
# Where every column of the schema stands.  A test checks these against the schema itself, so a column
# added later cannot be forgotten by rotate-key or the re-sealing migration.
SEALED = {   # table -> (row key bound into each value's associated data, sealed columns)
    "queue": (("channel", "direction", "dedupe"), ("body",)),
    "messages": (("id",), ("wa_chat_enc", "wa_msg_enc", "sig_author_enc", "sig_conv_enc", "wa_sender_enc")),
    "chats": (("channel", "wa_chat"), ("wa_chat_enc", "name_enc")),
    "contacts": (("channel", "jid"), ("name_enc",)),
    "lids": (("channel", "lid"), ("pn_enc",)),
    "state": (("channel", "key"), ("value_enc",)),
    "signal_groups": (("channel", "wa_chat"), ("wa_chat_enc", "group_enc", "name_enc")),
}
TOKENS = {   # table -> token column -> (domain, sealed source: column or "column.field"); rotate-key recomputes them
    "queue": {"dedupe": ("dedupe", "body._dedupe"), "chat": ("chat", "body._chat")},
    "messages": {"wa_chat": ("chat", "wa_chat_enc"), "wa_msg": ("msg", "wa_msg_enc"),
                 "wa_sender": ("jid", "wa_sender_enc")},
    "chats": {"wa_chat": ("chat", "wa_chat_enc")},
    "signal_groups": {"wa_chat": ("chat", "wa_chat_enc"), "group_tok": ("group", "group_enc")},
    # no sealed source: rotate-key empties these caches (refilled from WAHA) and drops the state rows
    # holding tokens (owner_uuid, reaction:<token>)
    "contacts": {"jid": ("jid", None)}, "lids": {"lid": ("lid", None)},
    "state": {"key": ("msg", None), "value": ("uuid", None)},
}
ROTATION_DROPS = {"contacts": "1", "lids": "1", "state": "key='owner_uuid' OR key LIKE 'reaction:%'"}
PLAIN = {    # table -> columns that name nobody and hold no message content
    "meta": ("key", "value"),
    "queue": ("id", "channel", "direction", "kind", "state", "attempts", "next_at", "created_at", "updated_at", "error"),
    "messages": ("id", "channel", "direction", "sig_ts", "ack", "created_at"),
    "chats": ("channel", "short", "last_at", "name_at"),
    "contacts": ("channel", "updated_at"), "lids": ("channel", "updated_at"),
    "state": ("channel", "updated_at"),
    "lease": ("name", "holder", "expires_at", "generation", "beat", "period"),
    "signal_groups": ("channel", "tag", "state", "created_at", "renamed_at"),
}
ENDED = "state IN ('done', 'dead', 'muted')"   # the condition of the partial index queue_ended, word for word
SEALED_STATE = ("s2w-progress:", "reaction:")   # state keys whose value is sealed (value_enc)
Row = sqlite3.Row
ENQUEUE_MANY = 100    # rows in one multi-row INSERT: 9 values each, under SQLite's old limit of 999 variables
ENQUEUE_SQL = ("INSERT OR IGNORE INTO queue(channel, direction, dedupe, chat, kind, body, next_at, created_at, updated_at)"
               " VALUES (?,?,?,?,?,?,?,?,?)")


def kdf_record(n, r, p):
    return "scrypt n=%d r=%d p=%d" % (n, r, p)


def kdf_params(record, has_key):
    """(n, r, p) from a database's "kdf" record; without one, SCRYPT_LEGACY if it has a key already."""
    if record is None:
        return SCRYPT_LEGACY if has_key else (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    m = re.fullmatch(r"scrypt n=([0-9]{1,9}) r=([0-9]{1,4}) p=([0-9]{1,4})", record)
    if not m:
        raise CryptoError("the database's key derivation (%s) is unknown to this WhatSignal; run a newer release"
                          % shorten(record, 40))
    return tuple(int(x) for x in m.groups())


class _Waiter:
    """One submitted item; ``done`` is a bare lock, held until the waiter may go on (one wake-up, no Condition)."""
    __slots__ = ("item", "done", "lead", "result", "error")

    def __init__(self, item):
        self.item, self.done, self.lead, self.result, self.error = item, threading.Lock(), False, None, None
        self.done.acquire()


class GroupCommit:
    """Commits what concurrent callers submit in as few transactions as possible.

    The first caller to arrive while no commit runs becomes the leader: it takes
    every item waiting (its own included), commits them in one transaction with
    *commit_many* (a list of items -> a list of results), hands each waiter its
    result, and passes the lead to the first caller that arrived meanwhile.  So
    ``submit`` returns only after the transaction holding its item committed, or
    raises what made that transaction fail (nothing of the batch is written), and
    a lone caller commits at once without waking any other thread.
    """

    def __init__(self, commit_many):
        self.commit_many = commit_many
        self.lock = threading.Lock()
        self.queue = []
        self.busy = False

    def submit(self, item):
        me = _Waiter(item)
        with self.lock:
            self.queue.append(me)
            lead = not self.busy
            self.busy = True
        if not lead:
            me.done.acquire()
            if not me.lead:
                if me.error is not None:
                    raise StoreError(str(me.error) or "database write failed") from me.error
                return me.result
        with self.lock:
            batch, self.queue = self.queue, []
        try:
            results, error = self.commit_many([w.item for w in batch]), None
        except BaseException as e:   # every waiter of the batch hears of the failure, the leader re-raises it
            results, error = [None] * len(batch), e
        with self.lock:
            nxt = self.queue[0] if self.queue else None
            self.busy = nxt is not None
        for w, r in zip(batch, results):
            if w is not me:
                w.result, w.error = r, error
                w.done.release()
        if nxt is not None:
            nxt.lead = True
            nxt.done.release()
        if error is not None:
            raise error
        return results[0] if batch[0] is me else results[batch.index(me)]


class Store:
    """SQLite in WAL mode behind one lock; every write is one short transaction.

    Sealed values go through ``self.cipher`` (set by ``unlock``).  Methods that
    write raise StoreError when the database cannot take the write (locked, disk
    full), so callers can answer 503 instead of acknowledging.
    """

    busy_timeout_ms = 5000   # how long a write waits for another writer

    def __init__(self, path, synchronous="NORMAL"):
        self.path = path
        self.lock = threading.RLock()
        self.cipher = None
        if path != ":memory:":
            make_private_dir(os.path.dirname(os.path.abspath(path)))
            create_private_file(path)   # 0600: SQLite gives the -wal and -shm files the database's mode
        self.db = sqlite3.connect(path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = Row
        self.db.execute("PRAGMA busy_timeout=%d" % self.busy_timeout_ms)
        if self.db.execute("PRAGMA user_version").fetchone()[0] == 0:
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=%s" % ("FULL" if synchronous.upper() == "FULL" else "NORMAL"))
        self.db.execute("PRAGMA foreign_keys=ON")
        # deleted rows are overwritten, not left in free pages (not every SQLite build does it by default);
        # measured with bench: within the run-to-run noise
        self.db.execute("PRAGMA secure_delete=ON")
        self.group = GroupCommit(self._enqueue_rows)
        self.migrate()

    def close(self):
        with self.lock:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()

    def migrate(self):
        """Run forward migrations up to SCHEMA_VERSION."""
        with self.lock:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(SCHEMA):
                raise ConfigError(["database.path: schema version %d is newer than this WhatSignal (%d); "
                                   "run a newer release or restore a backup" % (version, len(SCHEMA))])
            for v in range(version, len(SCHEMA)):
                # a column already there (user_version set back by hand) is not added twice
                script = re.sub(r"ALTER TABLE (\w+) ADD COLUMN (\w+)[^;]*;", lambda m: "" if m.group(2) in [
                    r[1] for r in self.db.execute("PRAGMA table_info(%s)" % m.group(1))] else m.group(0), SCHEMA[v])
                self.db.executescript("BEGIN;" + script + "PRAGMA user_version=%d; COMMIT;" % (v + 1))

    @contextlib.contextmanager
    def tx(self):
        """One write transaction (BEGIN IMMEDIATE); StoreError if the database cannot take it."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError("database unavailable: %s" % e) from e
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError("database write failed: %s" % e) from e
                raise

    def query(self, sql, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def one(self, sql, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    # -- keys ---------------------------------------------------------------
    def meta(self, key, default=None):
        row = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else default

    def set_meta(self, key, value):
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def salt(self):
        salt = self.meta("salt")
        if salt is None:
            salt = secrets.token_hex(16)
            with self.tx() as db:
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('salt', ?)", (salt,))
            salt = self.meta("salt")
        return bytes.fromhex(salt)

    def kdf(self):
        """The scrypt parameters (n, r, p) this database's key is derived with.

        Recorded in meta "kdf" when the key check value is first written (and by
        rotate-key); a database without the record predates it: SCRYPT_LEGACY.
        """
        return kdf_params(self.meta("kdf"), self.meta("key_check") is not None)

    def unlock(self, secret, enabled=True, rand=NONCES):
        """Derive the cipher from *secret* and check it against the stored key check value."""
        n, r, p = self.kdf()
        cipher = Cipher(secret or "", self.salt(), enabled=enabled, rand=rand, n=n, r=r, p=p)
        kcv = self.meta("key_check")
        if self.meta("rotation"):
            raise CryptoError("a key rotation is unfinished; run `whatsignal.py rotate-key` again with "
                              "WHATSIGNAL_ENCRYPTION_SECRET_OLD and WHATSIGNAL_ENCRYPTION_SECRET set")
        if kcv is None:
            with self.tx() as db:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('kdf', ?)", (kdf_record(n, r, p),))
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('key_check', ?)", (cipher.key_check(),))
        elif kcv != cipher.key_check():
            if kcv.startswith("plain:") != (not enabled):
                raise CryptoError("the database was created with encryption %s; set WHATSIGNAL_ENABLE_ENCRYPTION "
                                  "back, or migrate with rotate-key" % ("disabled" if kcv.startswith("plain:") else "enabled"))
            raise CryptoError("WHATSIGNAL_ENCRYPTION_SECRET does not open this database (key check value differs); "
                              "use the secret it was created with, or rotate-key from the old one")
        self.cipher = cipher
        if self.meta("reseal"):
            running = self.serving(time.time()) or [h for h in [self.lease_holder(time.time())] if h]
            if running:
                raise CryptoError("an older WhatSignal is still running on this database (%s); stop it first: from "
                                  "schema version %d on, stored values are bound to their place and it could not read "
                                  "them" % (", ".join(sorted({h.split(":")[0] for h in running})), SCHEMA_VERSION))
            self.reseal()
        return cipher

    def reseal(self, batch=500):
        """Bind every value sealed before schema version 5 to its place (table, column, row key); resumable.

        Runs once, at the first unlock after the upgrade, before anything reads the database; until it
        has finished (``reseal`` in meta) the next unlock goes on where it stopped.  Afterwards a value
        without associated data (Cipher version 1) is refused like a forged one.
        """
        for table, (keycols, cols) in SEALED.items():
            last = -1
            while True:
                rows = self.query("SELECT rowid AS rid, * FROM %s WHERE rowid > ? ORDER BY rowid LIMIT ?" % table,
                                  (last, batch))
                if not rows:
                    break
                with self.tx() as db:
                    for r in rows:
                        last = r["rid"]
                        key = [r[k] for k in keycols]
                        sets = {c: self.cipher.encrypt(self.cipher.decrypt_legacy(r[c], b""),
                                                       seal_context(table, c, *key))
                                for c in cols if r[c] is not None and bytes(r[c][:1]) == bytes([Cipher.LEGACY])}
                        if table == "state" and r["value"] is not None and r["key"].startswith(SEALED_STATE):
                            sets.update(value=None, value_enc=self.cipher.encrypt(r["value"], seal_context(
                                "state", "value_enc", *key)))
                        if table == "messages" and r["wa_sender"] and r["wa_sender_enc"] is None:
                            sender = self._legacy_sender(db, r)
                            if sender:
                                sets["wa_sender_enc"] = self.cipher.encrypt(sender, seal_context(
                                    "messages", "wa_sender_enc", *key))
                        if sets:
                            db.execute("UPDATE %s SET %s WHERE rowid=?" % (table, ", ".join("%s=?" % c for c in sets)),
                                       list(sets.values()) + [r["rid"]])
        with self.tx() as db:
            db.execute("DELETE FROM meta WHERE key='reseal'")

    def _legacy_sender(self, db, row):
        """The author of a message mapped before schema version 5 (only its token was kept), from its queued
        original while retention keeps it: the candidate whose token matches, or None."""
        wa = self.cipher.decrypt_legacy(row["wa_msg_enc"], seal_context("messages", "wa_msg_enc", row["id"]))
        if wa is None:
            return None
        dedupe = self.tok("dedupe", "m:" + bare_msg_id(wa.decode("utf-8", "surrogatepass")))
        q = db.execute("SELECT * FROM queue WHERE channel=? AND direction='w2s' AND dedupe=?",
                       (row["channel"], dedupe)).fetchone()
        try:
            rec = json.loads(self.cipher.decrypt_legacy(q["body"], seal_context("queue", "body", *[
                q[k] for k in SEALED["queue"][0]]))) if q else {}
            sender = rec.get("sender")
            candidates = [sender]
            lid = db.execute("SELECT * FROM lids WHERE channel=? AND lid=?",
                             (row["channel"], self.tok("lid", sender))).fetchone() if sender else None
            if lid and lid["pn_enc"] is not None:
                candidates.append(self.cipher.decrypt_legacy(lid["pn_enc"], seal_context(
                    "lids", "pn_enc", lid["channel"], lid["lid"])).decode("utf-8", "surrogatepass"))
        except (CryptoError, ValueError, AttributeError):
            return None
        return next((c for c in candidates if c and self.tok("jid", c) == row["wa_sender"]), None)

    def seal(self, value, table, column, *key):
        """*value* sealed for its place: *table*, *column* and the row's stable key (SEALED)."""
        return self.cipher.encrypt(value, seal_context(table, column, *key))

    def open(self, blob, table, column, *key):
        """The value sealed in *blob*; CryptoError if it was altered or belongs to another place."""
        return self.cipher.decrypt(blob, seal_context(table, column, *key))

    def open_row(self, row, table, column):
        """Open *column* of a fetched *row* of *table*, with the row key SEALED names."""
        return self.open(row[column], table, column, *[row[k] for k in SEALED[table][0]])

    def tok(self, domain, value):
        return self.cipher.token(domain, value)

    # -- queue ----------------------------------------------------------------
    def enqueue(self, channel, direction, dedupe, chat, kind, record, now):
        """Commit *record* for delivery; return False if *dedupe* was seen before."""
        record = dict(record, _dedupe=dedupe, _chat=chat)   # kept sealed so rotate-key can recompute tokens
        dedupe_tok = self.tok("dedupe", dedupe)
        body = self.seal(json.dumps(record, ensure_ascii=False, separators=(",", ":")), "queue", "body",
                         channel, direction, dedupe_tok)
        row = (channel, direction, dedupe_tok, self.tok("chat", chat), kind, body, now, now, now)
        return self.group.submit(row)     # sealed and tokenised before: only the commit is serialized

    def _enqueue_rows(self, rows):
        """Commit *rows* in one transaction; return, for each, whether it was new.

        Up to ENQUEUE_MANY rows go in as one multi-row statement in autocommit: its own transaction and
        one call into SQLite, which lets go of the interpreter lock once (a statement per row in BEGIN ...
        COMMIT let go of it for each).  The rows a statement inserts get consecutive row ids, so when some
        were there already, the new ones are read back by id.  A key twice in one batch is new once.
        """
        with self.lock:
            try:
                if len(rows) == 1:
                    return [self.db.execute(ENQUEUE_SQL, rows[0]).rowcount == 1]
                if len(rows) > ENQUEUE_MANY:
                    with self.tx() as db:
                        return [db.execute(ENQUEUE_SQL, row).rowcount == 1 for row in rows]
                first = {}
                for i, row in enumerate(rows):
                    first.setdefault(row[:3], i)      # (channel, direction, dedupe)
                fresh = [rows[i] for i in sorted(first.values())]
                cur = self.db.execute(ENQUEUE_SQL + ",(?,?,?,?,?,?,?,?,?)" * (len(fresh) - 1),
                                      [v for row in fresh for v in row])
                n, last = cur.rowcount, cur.lastrowid
                if n == len(fresh):
                    new = set(first)
                elif n == 0:
                    new = set()
                else:
                    new = {tuple(r) for r in self.db.execute(
                        "SELECT channel, direction, dedupe FROM queue WHERE id > ? AND id <= ?", (last - n, last))}
            except sqlite3.Error as e:
                raise StoreError("database write failed: %s" % e) from e
            return [row[:3] in new and first[row[:3]] == i for i, row in enumerate(rows)]

    def pending(self, direction, limit=256, after=0):
        """Pending items in the order they arrived, from id *after* on."""
        return self.query("SELECT * FROM queue WHERE direction=? AND state='pending' AND id > ? ORDER BY id LIMIT ?",
                          (direction, after, limit))

    def record_of(self, row):
        return json.loads(self.open_row(row, "queue", "body"))

    def finish(self, item_id, state, now, error=None, attempts=None, next_at=None, after=None, fence=None):
        """Set an item's state ('done', 'dead' or 'pending' with a retry time) in one transaction.

        *after* (a function of the open connection) runs in the same transaction,
        so a delivered item and its mapping are recorded together.  *fence* (likewise) runs
        first and raises LeaseLost when the delivery lease has passed to another instance.
        """
        with self.tx() as db:
            if fence:
                fence(db)
            if after:
                after(db)
            db.execute("UPDATE queue SET state=?, error=?, attempts=COALESCE(?, attempts),"
                       " next_at=COALESCE(?, next_at), updated_at=? WHERE id=? AND state='pending'",
                       (state, error, attempts, next_at, now, item_id))

    def counts(self):
        rows = self.query("SELECT direction, state, COUNT(*), MIN(created_at) FROM queue GROUP BY direction, state")
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def queue_depth(self, direction):
        return self.one("SELECT COUNT(*) FROM queue WHERE direction=? AND state='pending'", (direction,))[0]

    # -- mappings -------------------------------------------------------------
    def add_mapping(self, db, channel, direction, chat, wa_id, sig_ts, sig_author, now, conv=None, sender=None):
        rid = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()[0]   # its sealed values name it
        seal = lambda value, column: self.seal(value, "messages", column, rid)
        db.execute("INSERT INTO messages(id, channel, direction, wa_chat, wa_chat_enc, wa_msg, wa_msg_enc, sig_ts,"
                   " sig_author_enc, sig_conv_enc, wa_sender, wa_sender_enc, created_at)"
                   " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (rid, channel, direction, self.tok("chat", chat), seal(chat, "wa_chat_enc"),
                    self.tok("msg", bare_msg_id(wa_id)) if wa_id else None, seal(wa_id, "wa_msg_enc"),
                    sig_ts, seal(sig_author, "sig_author_enc"), seal(conv, "sig_conv_enc"),
                    self.tok("jid", sender) if sender else None, seal(sender, "wa_sender_enc"), now))

    def _mapping(self, row):
        if row is None:
            return None
        o = lambda column: self.open_row(row, "messages", column)
        return {"direction": row["direction"], "chat": o("wa_chat_enc"), "wa_id": o("wa_msg_enc"), "sig_ts": row["sig_ts"],
                "sig_author": o("sig_author_enc"), "ack": row["ack"], "rowid": row["id"],
                "conv": o("sig_conv_enc"), "sender_tok": row["wa_sender"]}

    def by_wa(self, channel, bare_id, chat=None, strict=False):
        """The mapping of the WhatsApp message with *bare_id*: in *chat* if given (only there, if *strict*)."""
        rows = self.query("SELECT * FROM messages WHERE channel=? AND wa_msg=? ORDER BY id",
                          (channel, self.tok("msg", bare_id)))
        if chat:
            rows = [r for r in rows if r["wa_chat"] == self.tok("chat", chat)] or ([] if strict else rows)
        return self._mapping(rows[0]) if rows else None

    def by_sig(self, channel, sig_ts):
        """The mapping whose Signal side has sent-timestamp *sig_ts*."""
        return self._mapping(self.one("SELECT * FROM messages WHERE channel=? AND sig_ts=? ORDER BY id LIMIT 1",
                                      (channel, sig_ts)))

    def last_forwarded(self, channel, before=None):
        """The mapping of the most recent WhatsApp message forwarded to the owner (up to time *before*)."""
        return self._mapping(self.one("SELECT * FROM messages WHERE channel=? AND direction='w2s' AND created_at <= ?"
                                      " ORDER BY id DESC LIMIT 1", (channel, 1e18 if before is None else before)))

    def set_ack(self, channel, bare_id, ack):
        with self.tx() as db:
            db.execute("UPDATE messages SET ack=MAX(COALESCE(ack, -1), ?) WHERE channel=? AND wa_msg=?",
                       (ack, channel, self.tok("msg", bare_id)))

    # -- chats, names, state --------------------------------------------------
    def touch_chat(self, channel, chat, now, name=None, db=None):
        """Record that *chat* was active (inside transaction *db* if given); return its short number."""
        if db is None:
            with self.tx() as db:
                return self.touch_chat(channel, chat, now, name, db)
        t = self.tok("chat", chat)
        if True:
            row = db.execute("SELECT short FROM chats WHERE channel=? AND wa_chat=?", (channel, t)).fetchone()
            if row:
                db.execute("UPDATE chats SET last_at=? WHERE channel=? AND wa_chat=?", (now, channel, t))
                if name:
                    db.execute("UPDATE chats SET name_enc=?, name_at=? WHERE channel=? AND wa_chat=?",
                               (self.seal(name, "chats", "name_enc", channel, t), now, channel, t))
                return row[0]
            short = (db.execute("SELECT MAX(short) FROM chats WHERE channel=?", (channel,)).fetchone()[0] or 0) + 1
            db.execute("INSERT INTO chats(channel, wa_chat, wa_chat_enc, name_enc, short, last_at, name_at)"
                       " VALUES (?,?,?,?,?,?,?)", (channel, t, self.seal(chat, "chats", "wa_chat_enc", channel, t),
                                                   self.seal(name, "chats", "name_enc", channel, t), short, now,
                                                   now if name else 0))
            return short

    def chat_name(self, channel, chat):
        """Return (name, looked-up-at) of *chat*, or (None, 0)."""
        t = self.tok("chat", chat)
        row = self.one("SELECT name_enc, name_at FROM chats WHERE channel=? AND wa_chat=?", (channel, t))
        return (self.open(row[0], "chats", "name_enc", channel, t), row[1]) if row else (None, 0)

    def recent_chats(self, channel, limit=10):
        rows = self.query("SELECT * FROM chats WHERE channel=? ORDER BY last_at DESC LIMIT ?", (channel, limit))
        return [{"short": r["short"], "chat": self.open_row(r, "chats", "wa_chat_enc"),
                 "name": self.open_row(r, "chats", "name_enc")}
                for r in rows]

    def all_chats(self, channel):
        return [{"short": r["short"], "chat": self.open_row(r, "chats", "wa_chat_enc"),
                 "name": self.open_row(r, "chats", "name_enc")}
                for r in self.query("SELECT * FROM chats WHERE channel=?", (channel,))]

    def contact(self, channel, jid):
        """Return (name, updated_at) of a WhatsApp user, or (None, 0)."""
        t = self.tok("jid", jid)
        row = self.one("SELECT name_enc, updated_at FROM contacts WHERE channel=? AND jid=?", (channel, t))
        return (self.open(row[0], "contacts", "name_enc", channel, t), row[1]) if row else (None, 0)

    def set_contact(self, channel, jid, name, now):
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO contacts(channel, jid, name_enc, updated_at) VALUES (?,?,?,?)",
                       (channel, self.tok("jid", jid), self.seal(name, "contacts", "name_enc", channel, self.tok("jid", jid)),
                        now))

    def lid(self, channel, lid):
        t = self.tok("lid", lid)
        row = self.one("SELECT pn_enc FROM lids WHERE channel=? AND lid=?", (channel, t))
        return (True, self.open(row[0], "lids", "pn_enc", channel, t)) if row else (False, None)

    def set_lid(self, channel, lid, pn, now):
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO lids(channel, lid, pn_enc, updated_at) VALUES (?,?,?,?)",
                       (channel, self.tok("lid", lid), self.seal(pn, "lids", "pn_enc", channel, self.tok("lid", lid)), now))

    def state(self, channel, key, default=None, sealed=False):
        """A state value; *sealed* for one stored with ``set_state(..., sealed=True)``."""
        row = self.one("SELECT value, value_enc FROM state WHERE channel=? AND key=?", (channel, key))
        if not row:
            return default
        return self.open(row[1], "state", "value_enc", channel, key) if sealed else row[0]

    def set_state(self, channel, key, value, now, sealed=False):
        """Keep *value* under *key*; *sealed* for anything that names someone or holds content."""
        plain, enc = (None, self.seal(value, "state", "value_enc", channel, key)) if sealed else (value, None)
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO state(channel, key, value, value_enc, updated_at) VALUES (?,?,?,?,?)",
                       (channel, key, plain, enc, now))

    # -- groups layout -----------------------------------------------------------
    def _group(self, row):
        if row is None:
            return None
        o = lambda column: self.open_row(row, "signal_groups", column)
        return {"chat": o("wa_chat_enc"), "group": o("group_enc"), "name": o("name_enc"), "tag": row["tag"],
                "state": row["state"],
                "renamed_at": row["renamed_at"]}

    def group_of_chat(self, channel, chat):
        return self._group(self.one("SELECT * FROM signal_groups WHERE channel=? AND wa_chat=?",
                                    (channel, self.tok("chat", chat))))

    def chat_of_group(self, channel, group_id):
        return self._group(self.one("SELECT * FROM signal_groups WHERE channel=? AND group_tok=?",
                                    (channel, self.tok("group", group_id))))

    def save_group(self, channel, chat, now, state, tag, group_id=None, name=None, renamed=False):
        """Insert or update the Signal group of *chat*."""
        t = self.tok("chat", chat)
        seal = lambda value, column: self.seal(value, "signal_groups", column, channel, t)
        with self.tx() as db:
            db.execute("INSERT INTO signal_groups(channel, wa_chat, wa_chat_enc, group_tok, group_enc, name_enc, tag,"
                       " state, created_at, renamed_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                       " ON CONFLICT(channel, wa_chat) DO UPDATE SET group_tok=excluded.group_tok,"
                       " group_enc=excluded.group_enc, name_enc=excluded.name_enc, tag=excluded.tag,"
                       " state=excluded.state, renamed_at=CASE WHEN ? THEN excluded.renamed_at ELSE renamed_at END",
                       (channel, t, seal(chat, "wa_chat_enc"), self.tok("group", group_id) if group_id else None,
                        seal(group_id, "group_enc"), seal(name, "name_enc"), tag, state, now, now if renamed else 0,
                        renamed))

    def release_held(self, channel, chat, now):
        """Make a reopened chat's items due now; return how many wait for it.

        Also every item held under another id form of a chat (@lid or phone number): those of
        chats still left are simply held again.
        """
        with self.tx() as db:
            # pending items only, through their index: not every item the channel ever had
            db.execute("UPDATE queue INDEXED BY queue_pending_only SET next_at=? WHERE channel=? AND state='pending'"
                       " AND error LIKE ?", (now, channel, "%" + HELD_REASON + "%"))
            return db.execute("UPDATE queue INDEXED BY queue_pending_only SET next_at=? WHERE channel=? AND chat=?"
                              " AND state='pending'",
                              (now, channel, self.tok("chat", chat))).rowcount

    # -- lease ------------------------------------------------------------------
    def acquire_lease(self, holder, now, seconds=LEASE_SECONDS, name="delivery", is_dead=None, lapsed=None):
        """Take or renew a lease; return its generation (1, 2, ...) when *holder* has it, else None.

        Another holder's lease is taken only when it was released, when its holder is known dead
        (*is_dead*), or when *lapsed* (given the row: holder, expires_at, generation, beat, period) says its
        holder stopped renewing it; without *lapsed*, when it expired by the wall clock.  Every renewal
        counts ``beat`` up; every change of holder counts ``generation`` up.
        """
        with self.tx() as db:
            row = db.execute("SELECT holder, expires_at, generation, beat, period FROM lease WHERE name=?",
                             (name,)).fetchone()
            if row and row[0] and row[0] != holder and not (is_dead and is_dead(row[0])) \
                    and not (lapsed(tuple(row)) if lapsed else row[1] <= now):
                return None
            generation = (row[2] if row[0] == holder else row[2] + 1) if row else 1
            db.execute("INSERT OR REPLACE INTO lease(name, holder, expires_at, generation, beat, period)"
                       " VALUES (?,?,?,?,?,?)", (name, holder, now + seconds, generation, (row[3] + 1) if row else 1,
                                                 seconds))
            return generation

    def release_lease(self, holder, name="delivery"):
        """Give up a lease held by *holder*: another instance may take it at once (its generation goes on)."""
        with self.tx() as db:
            if name == "delivery":
                db.execute("UPDATE lease SET holder='', expires_at=0 WHERE name=? AND holder=?", (name, holder))
            else:
                db.execute("DELETE FROM lease WHERE name=? AND holder=?", (name, holder))

    def lease_fence(self, db, holder, generation, name="delivery"):
        """Raise LeaseLost unless *holder* still holds lease *name* in *generation* (inside transaction *db*)."""
        row = db.execute("SELECT holder, generation FROM lease WHERE name=?", (name,)).fetchone()
        if not row or row[0] != holder or row[1] != generation:
            raise LeaseLost("the delivery lease passed to another instance")

    def lease_holder(self, now, name="delivery"):
        row = self.one("SELECT holder, expires_at FROM lease WHERE name=?", (name,))
        return row[0] if row and row[1] > now else None

    def serving(self, now):
        """Holders of every instance serving this database (active or standby), by their heartbeats."""
        rows = self.query("SELECT holder FROM lease WHERE name LIKE 'serving:%' AND expires_at > ?", (now,))
        return [r[0] for r in rows]

    def size_bytes(self):
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total

###############################################################################
# Clients #####################################################################
###############################################################################

Response = collections.namedtuple("Response", "status headers body")


class StreamBody:
    """A request body of byte strings and files sent base64-encoded in chunks.

    Lets a 20 MB attachment go to signal-cli inside a JSON document without
    ever holding its base64 text (or the JSON) in memory whole.
    """

    CHUNK = 3 * 16384

    def __init__(self, parts):
        self.parts = parts   # bytes, or ("b64", path)

    def __len__(self):
        n = 0
        for p in self.parts:
            n += len(p) if isinstance(p, bytes) else 4 * ((os.path.getsize(p[1]) + 2) // 3)
        return n

    def __iter__(self):
        for p in self.parts:
            if isinstance(p, bytes):
                yield p
                continue
            with open(p[1], "rb") as f:
                while True:
                    chunk = f.read(self.CHUNK)
                    if not chunk:
                        break
                    yield base64.b64encode(chunk)


def attachment_markers(n):
    """Placeholders for ``json_stream``: random, so no message text can contain one."""
    nonce = secrets.token_hex(8)
    return ["\x00%s-%d" % (nonce, i) for i in range(n)]


def data_uri_name(name):
    """A file name as a data-URI parameter value that signal-cli decodes back to exactly *name*.

    signal-cli URL-decodes parameter values (``+`` becomes a space, a ``%`` not
    followed by two hex digits makes it read the whole URI as a file path) and
    cuts parameters at ``;``, ``=`` and ``,`` (DataURI.java): percent-encode all
    but the unreserved characters.
    """
    return urllib.parse.quote(name, safe="")


def json_stream(obj, files, markers, encode_name=data_uri_name):
    """Serialize *obj* where the strings *markers* stand for base64 data URIs of ``files[N]``.

    ``files`` holds (mime, filename, path); returns a StreamBody.
    """
    text = json.dumps(obj, separators=(",", ":"))
    parts, pos = [], 0
    for i, (mime, name, path) in enumerate(files):
        marker = json.dumps(markers[i])[1:-1]
        at = text.index(marker, pos)
        mime = mime.split(";")[0].strip() or "application/octet-stream"
        head = "data:%s;filename=%s;base64," % (mime, encode_name(safe_filename(name, mime)))
        parts.append((text[pos:at] + head).encode("utf-8"))
        parts.append(("b64", path))
        pos = at + len(marker)
    parts.append(text[pos:].encode("utf-8"))
    return StreamBody(parts)


TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)    # Linux only


def arm_quickack(sock):
    """Have the kernel ACK the next segment at once; return False where that cannot be done.

    signal-cli's daemon is the JDK's HTTP server: Nagle's algorithm on, a
    response's headers and body in two writes, so the body waits for our ACK
    of the headers, which a kept-alive connection delays by ~40 ms.  Linux
    clears TCP_QUICKACK again by itself: arm it before every response read.
    """
    if TCP_QUICKACK is None or sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        return True
    except OSError:
        return False


class HttpTransport:
    """HTTP/1.1 with one kept-alive connection per thread and origin.

    ``request`` raises TransientError when the upstream cannot be reached and
    returns a Response for every HTTP answer, whatever its status.  Where the
    platform has no TCP_QUICKACK (or *quickack* is False), each request uses a
    new connection instead: a server that writes like the JDK's would stall
    every kept-alive response on our delayed ACK (measured 44 ms a call,
    against 1 ms on a new connection and 0.2 ms with TCP_QUICKACK).
    """

    def __init__(self, timeout=UPSTREAM_TIMEOUT, quickack=TCP_QUICKACK is not None):
        self.timeout = timeout
        self.quickack = quickack
        self.local = threading.local()

    def _conn(self, scheme, netloc, timeout, fresh=False):
        pool = self.local.__dict__.setdefault("pool", {})
        key = (scheme, netloc)
        conn = pool.get(key)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = pool[key] = cls(netloc, timeout=timeout)
            conn.reused = False
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def open(self, method, url, headers=None, body=None, timeout=None):
        """Send a request on a new connection and return the live HTTPResponse (for streams)."""
        u = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.netloc, timeout=timeout or self.timeout)
        try:
            conn.request(method, (u.path or "/") + ("?" + u.query if u.query else ""), body=body,
                         headers=headers or {})
            sock = conn.sock          # http.client lets go of it when the response is read to its close
            if self.quickack:
                arm_quickack(sock)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise TransientError("cannot reach %s (%s)" % (u.netloc, e.__class__.__name__)) from e
        resp.conn, resp.sock = conn, sock
        return resp

    def request(self, method, url, headers=None, body=None, timeout=None):
        u = urllib.parse.urlsplit(url)
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        hdrs = {"Connection": "keep-alive" if self.quickack else "close"}
        hdrs.update(headers or {})
        if isinstance(body, StreamBody):
            hdrs["Content-Length"] = str(len(body))
        for attempt in (0, 1):
            conn = self._conn(u.scheme, u.netloc, timeout or self.timeout, fresh=attempt == 1)
            reused = conn.reused
            try:
                conn.request(method, path, body=body, headers=hdrs)
                keep = self.quickack and arm_quickack(conn.sock)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and attempt == 0 and not isinstance(body, StreamBody):
                    continue      # the upstream closed an idle kept-alive connection: try once afresh
                raise TransientError("%s closed the connection (%s)" % (u.netloc, e.__class__.__name__)) from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransientError("cannot reach %s (%s)" % (u.netloc, e.__class__.__name__ if not isinstance(
                    e, socket.timeout) else "timeout")) from e
            conn.reused = True
            if resp.will_close or not keep:
                conn.close()
                conn.reused = False
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise TransientError("unreachable")  # pragma: no cover


def _json_body(resp):
    try:
        return json.loads(resp.body.decode("utf-8")) if resp.body else None
    except (UnicodeDecodeError, ValueError):
        return None


def _retry_after(resp):
    try:
        return float(resp.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


class WahaClient:
    """WAHA's REST API (waha.md section 5); every call sends X-Api-Key."""

    def __init__(self, base_url, api_key, transport=None, media_base=None):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.http = transport or HttpTransport()
        self.origin = urllib.parse.urlsplit(self.base)[:2]
        # WAHA writes media URLs with its own WAHA_BASE_URL (http://localhost:3000 by default), which
        # behind Docker is not how the bridge reaches it: such URLs are accepted, and fetched from base_url.
        self.origins = {self.origin, urllib.parse.urlsplit(media_base.rstrip("/"))[:2] if media_base else self.origin}

    def _headers(self, extra=None):
        h = {"Accept": "application/json"}
        if self.api_key:
            h["X-Api-Key"] = self.api_key
        h.update(extra or {})
        return h

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        hdrs = self._headers({"Content-Type": "application/json"} if data is not None else None)
        resp = self.http.request(method, self.base + path, hdrs, data)
        if resp.status in ok:
            return _json_body(resp)
        reason = _waha_reason(resp)
        if resp.status in (422, 501) and ("only in Plus version" in reason or "not implemented by" in reason):
            raise WahaMediaRefused("WAHA refused it (%d): %s" % (resp.status, reason), "Plus version" in reason)
        if resp.status >= 500 or resp.status in (401, 403, 408, 429):
            raise TransientError("WAHA answered %d: %s" % (resp.status, reason), _retry_after(resp))
        if resp.status == 422 and "not as expected" in reason:
            raise TransientError("WAHA session is not WORKING: %s" % reason)
        if resp.status == 404 and "session" in reason.lower():
            raise TransientError("WAHA does not know this session: %s" % reason)
        raise PermanentError("WAHA refused it (%d): %s" % (resp.status, reason))

    @staticmethod
    def message_id(result):
        """Return the serialized id of a sent message from any engine's response shape (waha.md 5.2)."""
        if not isinstance(result, dict):
            return None
        mid = result.get("id")
        if isinstance(mid, str):
            return mid
        if isinstance(mid, dict) and isinstance(mid.get("_serialized"), str):
            return mid["_serialized"]
        key = result.get("key")          # NOWEB: the raw Baileys message; NOWEB's own ids have three parts
        if isinstance(key, dict) and isinstance(key.get("remoteJid"), str) and isinstance(key.get("id"), str):
            chat = normalize_jid(key["remoteJid"])
            if chat:
                return "%s_%s_%s" % (str(bool(key.get("fromMe"))).lower(), chat, key["id"])
        return None

    def send_text(self, session, chat, text, reply_to=None, mentions=None):
        body = {"session": session, "chatId": chat, "text": text}
        if reply_to:
            body["reply_to"] = reply_to
        if mentions:
            body["mentions"] = list(mentions)
        return self.message_id(self.call("POST", "/api/sendText", body))

    def send_file(self, session, chat, kind, mime, filename, data, caption=None, reply_to=None):
        """Send media; *kind* is image, video, voice or file; *data* the raw bytes."""
        body = {"session": session, "chatId": chat,
                "file": {"mimetype": mime, "filename": filename, "data": base64.b64encode(data).decode()}}
        if kind in ("video", "voice"):
            body["convert"] = kind == "voice" and "ogg" not in mime
        if caption and kind != "voice":
            body["caption"] = caption
        if reply_to:
            body["reply_to"] = reply_to
        path = {"image": "/api/sendImage", "video": "/api/sendVideo", "voice": "/api/sendVoice"}.get(kind, "/api/sendFile")
        return self.message_id(self.call("POST", path, body))

    def vote(self, session, chat, poll_id, options):
        """Vote in a poll: POST /api/sendPollVote (pollMessageId serialized; GOWS uses only its bare id)."""
        self.call("POST", "/api/sendPollVote", {"session": session, "chatId": chat, "pollMessageId": poll_id,
                                               "votes": list(options)})

    def react(self, session, message_id, emoji):
        self.call("PUT", "/api/reaction", {"session": session, "messageId": message_id, "reaction": emoji})

    def seen(self, session, chat, message_ids):
        self.call("POST", "/api/sendSeen", {"session": session, "chatId": chat, "messageIds": message_ids})

    def typing(self, session, chat, on):
        self.call("POST", "/api/startTyping" if on else "/api/stopTyping", {"session": session, "chatId": chat})

    def _msg_path(self, session, chat, message_id):
        q = lambda s: urllib.parse.quote(s, safe="")
        return "/api/%s/chats/%s/messages/%s" % (q(session), q(chat), q(message_id))

    def edit(self, session, chat, message_id, text):
        self.call("PUT", self._msg_path(session, chat, message_id), {"text": text})

    def delete(self, session, chat, message_id):
        self.call("DELETE", self._msg_path(session, chat, message_id))

    def contact_name(self, session, jid):
        """Return (name saved in the owner's contacts, the person's own push name); either may be None."""
        q = urllib.parse.urlencode({"contactId": jid, "session": session})
        c = self.call("GET", "/api/contacts?" + q)
        if not isinstance(c, dict):
            return None, None
        pick = lambda *keys: next((clean_name(c[k]) for k in keys if clean_name(c.get(k))), None)
        saved = pick("name", "shortName") if c.get("isMyContact") is not False else None
        return saved, pick("pushname")

    def group_name(self, session, jid):
        g = self.call("GET", "/api/%s/groups/%s" % (urllib.parse.quote(session, safe=""), urllib.parse.quote(jid, safe="")))
        if isinstance(g, dict):      # NOWEB: subject; WEBJS: name / groupMetadata.subject; GOWS (whatsmeow): Name
            for k in ("subject", "name", "Name"):
                if isinstance(g.get(k), str) and g[k].strip():
                    return g[k].strip()[:100]
            meta = g.get("groupMetadata")
            if isinstance(meta, dict) and isinstance(meta.get("subject"), str):
                return meta["subject"][:100]
        return None

    def participants(self, session, group):
        """Ids of a group's participants (GET /api/{session}/groups/{id}/participants/v2: [{id, role}])."""
        r = self.call("GET", "/api/%s/groups/%s/participants/v2" % (urllib.parse.quote(session, safe=""),
                                                                     urllib.parse.quote(group, safe="")))
        return [normalize_jid(p["id"]) for p in r if isinstance(p, dict) and isinstance(p.get("id"), str)
                and normalize_jid(p["id"])] if isinstance(r, list) else []

    def lid_to_pn(self, session, lid):
        r = self.call("GET", "/api/%s/lids/%s" % (urllib.parse.quote(session, safe=""), urllib.parse.quote(lid, safe="")))
        return normalize_jid(r.get("pn")) if isinstance(r, dict) and isinstance(r.get("pn"), str) else None

    def recent_chats(self, session, limit):
        """Chats, most recently active first: [(chat id, last activity in Unix seconds or None)]."""
        q = urllib.parse.urlencode({"sortBy": "conversationTimestamp", "sortOrder": "desc", "limit": int(limit)})
        r = self.call("GET", "/api/%s/chats?%s" % (urllib.parse.quote(session, safe=""), q))
        out = []
        for c in r if isinstance(r, list) else []:
            if not isinstance(c, dict):
                continue
            cid = c.get("id")
            cid = cid.get("_serialized") if isinstance(cid, dict) else cid     # WEBJS: an id object
            ts = c.get("conversationTimestamp", c.get("timestamp"))           # GOWS/NOWEB, WEBJS
            if isinstance(ts, str) and ts.isdigit():
                ts = int(ts)
            ts = ts if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0 else None
            if isinstance(cid, str) and normalize_jid(cid):
                out.append((normalize_jid(cid), ts / 1000.0 if ts and ts > 1e11 else ts))
        return out

    def chat_messages(self, session, chat, since, limit):
        """The newest *limit* messages of *chat* sent at or after *since* (Unix seconds), as WAMessage dicts."""
        q = urllib.parse.urlencode({"filter.timestamp.gte": int(since), "limit": int(limit), "downloadMedia": "true",
                                    "sortBy": "timestamp", "sortOrder": "desc"})
        q = "/api/%s/chats/%s/messages?%s" % (urllib.parse.quote(session, safe=""), urllib.parse.quote(chat, safe=""), q)
        r = self.call("GET", q)
        return [m for m in r if isinstance(m, dict)] if isinstance(r, list) else []

    def session_status(self, session):
        r = self.call("GET", "/api/sessions/%s" % urllib.parse.quote(session, safe=""))
        return r.get("status") if isinstance(r, dict) else None

    def restart_session(self, session):
        self.call("POST", "/api/sessions/%s/restart" % urllib.parse.quote(session, safe=""))

    def ping(self):
        resp = self.http.request("GET", self.base + "/ping", self._headers(), timeout=3)
        if resp.status != 200:
            raise TransientError("WAHA /ping answered %d" % resp.status)

    def check_media_url(self, url):
        """Return the URL to fetch for media *url*; PermanentError unless it is on WAHA's own origin."""
        u = urllib.parse.urlsplit(url or "")
        if u.scheme not in ("http", "https") or (u.scheme, u.netloc) not in self.origins or u.username or u.password:
            raise PermanentError("media URL is not on WAHA's origin")
        return self.base + (u.path or "/") + ("?" + u.query if u.query else "")

    def download(self, url, dest, max_bytes):
        """Stream media at *url* (WAHA's origin only, no redirects) into *dest*; return (mime, size).

        Raises PermanentError when refused, too large or not found.
        """
        url = self.check_media_url(url)
        resp = self.http.open("GET", url, self._headers({"Accept": "*/*"}), timeout=UPSTREAM_TIMEOUT * 3)
        try:
            if resp.status == 404:
                raise PermanentError("media expired on WAHA")
            if 300 <= resp.status < 400:
                raise PermanentError("media URL redirects elsewhere; refused")
            if resp.status >= 500 or resp.status in (401, 429):
                raise TransientError("WAHA media download answered %d" % resp.status)
            if resp.status != 200:
                raise PermanentError("WAHA media download answered %d" % resp.status)
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PermanentError("size %d over limit" % int(declared))
            size = 0
            with os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise PermanentError("size %d over limit" % size)
                    f.write(chunk)
            if declared and declared.isdigit() and size != int(declared):
                raise TransientError("media download cut short (%d of %s bytes)" % (size, declared))
            return (resp.getheader("Content-Type") or "").split(";")[0].strip(), size
        except (OSError, http.client.HTTPException) as e:
            raise TransientError("media download interrupted (%s)" % e.__class__.__name__) from e
        finally:
            resp.conn.close()


def _waha_reason(resp):
    body = _json_body(resp)
    if isinstance(body, dict):
        for k in ("message", "error"):
            v = body.get(k)
            if isinstance(v, list):
                v = "; ".join(str(x) for x in v)
            if isinstance(v, dict):
                v = v.get("message")
            if v:
                return shorten(str(v), 160)
    return "HTTP %d" % resp.status


SignalAttachment = collections.namedtuple("SignalAttachment", "mime filename path")


class SignalClient:
    """What the bridge needs from Signal, whichever backend runs it.

    ``send`` returns the sent-timestamp (ms) of the new message; errors are
    TransientError (retry), IdentityError (owner's safety number changed) or
    PermanentError.  ``to`` is an E.164 number, a UUID, or ``group:<id>``.
    """

    def __init__(self, base_url, number, transport=None):
        self.base = base_url.rstrip("/")
        self.number = number
        self.http = transport or HttpTransport()
        self.problem = None    # a setup error signal-cli answers with, until it answers normally again
        self.log = None

    def setup_error(self, reason):
        """Note a configuration error (logged once, shown in /health and /status); return it to raise."""
        if self.problem != reason:
            self.problem = reason
            if self.log:
                self.log.error(reason)
        return SignalSetupError(reason, 30.0)

    def answered(self):
        """signal-cli took a request normally: whatever setup error it had is fixed."""
        if self.problem is not None:
            self.problem = None
            if self.log:
                self.log.info("signal-cli accepts the bridge's requests again")

    def health(self):
        """Raise an UpstreamError when the backend cannot serve the bridge."""
        self.check()
        if self.problem:
            raise SignalSetupError(self.problem, 30.0)


class SignalRpcClient(SignalClient):
    """signal-cli ``daemon --http``: JSON-RPC on /api/v1/rpc, SSE on /api/v1/events."""

    kind = "signal-cli daemon"

    def __init__(self, base_url, number, transport=None, attachment_dir=None):
        super().__init__(base_url, number, transport)
        self.ids = iter(range(1, 1 << 62))
        self.id_lock = threading.Lock()
        self.attachment_dir = attachment_dir
        self.problem_dir = None

    def call(self, method, params, body=None):
        with self.id_lock:
            rid = next(self.ids)
        # a daemon started without -a serves several accounts and needs ours on every call; with -a it is ignored
        req = {"jsonrpc": "2.0", "method": method, "params": dict(params, account=self.number), "id": rid}
        data = body(req) if body else json.dumps(req, separators=(",", ":")).encode()
        resp = self.http.request("POST", self.base + "/api/v1/rpc", {"Content-Type": "application/json"}, data)
        if resp.status == 421:
            raise self.setup_error(self.host_refused())
        if resp.status >= 500 or resp.status in (408, 429):
            raise TransientError("signal-cli answered HTTP %d" % resp.status)
        if resp.status != 200:
            raise PermanentError("signal-cli answered HTTP %d to %s" % (resp.status, method))
        msg = _json_body(resp)
        if not isinstance(msg, dict):
            raise TransientError("signal-cli sent an unreadable answer")
        err = msg.get("error")
        if isinstance(err, dict):
            if err.get("code") == -32602 and "account" in str(err.get("message")):
                raise self.setup_error(
                    "signal-cli does not serve the bridge's account signal.number %s (%s). Fix: register or link it in "
                    "that signal-cli, or correct signal.number" % (mask_phone(self.number), shorten(str(err.get("message")), 80)))
            e = _rpc_error(err, self.number)
            e.answered = True        # signal-cli read the request and refused it, as opposed to being unreachable
            self.answered()
            raise e
        self.answered()
        return msg.get("result")

    def host_refused(self):
        host = urllib.parse.urlsplit(self.base).netloc
        return ("signal-cli refuses the Host %s (HTTP 421: since 0.14.4 it accepts only the address it is bound to, "
                "with its port). Fix: start its daemon with --http 0.0.0.0:PORT, or make signal.rpcUrl name the host "
                "and port it is bound to; messages stay queued meanwhile" % host)

    @staticmethod
    def _to(to):
        return {"groupId": to[6:]} if to.startswith("group:") else {"recipient": [to]}

    def send(self, to, text, attachments=(), quote=None, edit_ts=None):
        params = self._to(to)
        params["message"] = text or ""
        if quote:
            params.update(quoteTimestamp=int(quote[0]), quoteAuthor=quote[1])
            if quote[2]:
                params["quoteMessage"] = quote[2]
        if edit_ts:
            params["editTimestamp"] = int(edit_ts)
        if not attachments:
            return _send_timestamp(self.call("send", params), to, self.number)
        inline, shared, entries = [], [], []
        try:
            for a in attachments:
                if self.attachment_dir and self.uri_length(a) > JSON_STRING_LIMIT:
                    shared.append(self._share(a))      # signal-cli also takes a file path it can read
                    entries.append(shared[-1])
                else:
                    inline.append(a)
                    entries.append(None)
            markers = iter(attachment_markers(len(inline)))
            params["attachments"] = [e or next(markers) for e in entries]
            markers = [m for m in params["attachments"] if m not in shared]
            try:
                result = self.call("send", params, lambda req: json_stream(req, inline, markers))
            except PermanentError as e:
                if getattr(e, "media", False):
                    raise MediaRefused(str(e)) from None
                raise
        finally:
            for path in shared:
                with contextlib.suppress(OSError):
                    os.remove(path)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(path))
        return _send_timestamp(result, to, self.number)

    @staticmethod
    def uri_length(att):
        """Characters of *att* as the data URI ``send`` writes (one JSON string for signal-cli)."""
        head = "data:%s;filename=%s;base64," % (att.mime, data_uri_name(safe_filename(att.filename, att.mime)))
        return len(head) + 4 * ((os.path.getsize(att.path) + 2) // 3)

    def attachment_problem(self, att):
        """Why *att* cannot go to signal-cli (a notice for the owner), or None."""
        if self.attachment_dir or self.uri_length(att) <= JSON_STRING_LIMIT:
            return None
        return "too large for signal-cli's JSON-RPC (about 15 MB at most)"

    def _share(self, att):
        """Copy *att* into signal.attachmentDir for signal-cli to read; return the path it is given."""
        try:
            d = os.path.join(self.attachment_dir, "whatsignal-" + secrets.token_hex(8))
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)             # signal-cli runs as its own user
            path = os.path.join(d, safe_filename(att.filename, att.mime))
            with open(att.path, "rb") as src, open(path, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)
            os.chmod(path, 0o644)
            return path
        except OSError as e:
            # retrying cannot fix the directory, and the chat must not wait for it: the text goes with a notice
            reason = ("cannot write into signal.attachmentDir (%s). Fix: create it, writable by the bridge and "
                      "readable by signal-cli at the same path" % (e.strerror or e.__class__.__name__))
            if self.log and self.problem_dir != reason:
                self.problem_dir = reason
                self.log.error(reason)
            raise MediaRefused(reason) from None

    def react(self, to, emoji, target_author, target_ts, remove=False):
        params = self._to(to)
        params.update(emoji=emoji or "👍", targetAuthor=target_author, targetTimestamp=int(target_ts), remove=remove)
        self.call("sendReaction", params)

    def remote_delete(self, to, ts):
        params = self._to(to)
        params["targetTimestamp"] = int(ts)
        self.call("remoteDelete", params)

    def trust(self, who):
        self.call("trust", {"recipient": who, "trustAllKnownKeys": True})

    def create_group(self, name, members, description):
        """Create a Signal group (``updateGroup`` without groupId); return its signal-cli id."""
        r = self.call("updateGroup", {"name": name, "member": list(members), "description": description})
        gid = r.get("groupId") if isinstance(r, dict) else None
        if not isinstance(gid, str):
            raise TransientError("signal-cli created a group but returned no groupId")
        return gid

    def rename_group(self, group_id, name):
        self.call("updateGroup", {"groupId": group_id, "name": name})

    def list_groups(self):
        """[{id, name, description, members: [number or uuid]}] of the bridge account."""
        out = []
        for g in self.call("listGroups", {}) or []:
            if isinstance(g, dict) and isinstance(g.get("id"), str):
                members = [m.get("number") or m.get("uuid") for m in g.get("members") or [] if isinstance(m, dict)]
                out.append({"id": g["id"], "name": g.get("name"), "description": g.get("description") or "",
                            "members": members})
        return out

    def get_attachment(self, att, max_bytes):
        if isinstance(att.get("size"), int) and att["size"] > max_bytes:
            # the answer would be the whole file as one base64 string: refuse before asking for it
            raise PermanentError("attachment of %s over media.maxSizeMB (%s)" % (human_size(att["size"]),
                                                                                human_size(max_bytes)))
        r = self.call("getAttachment", {"id": att["id"]})
        data = r.get("data") if isinstance(r, dict) else None
        if not isinstance(data, str):
            raise PermanentError("signal-cli returned no attachment data")
        if len(data) * 3 // 4 > max_bytes:
            raise PermanentError("attachment over the size limit")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise PermanentError("signal-cli returned bad attachment data") from e

    def check(self):
        resp = self.http.request("GET", self.base + "/api/v1/check", timeout=3)
        if resp.status != 200:
            raise TransientError("signal-cli /api/v1/check answered %d" % resp.status)

    def health(self):
        self.check()
        self.call("version", {})      # /api/v1/check has no Host check: only the RPC endpoint tells
        if self.problem:
            raise SignalSetupError(self.problem, 30.0)

    def events(self, stop, on_open=None):
        """Yield receive objects from the SSE stream until it ends; raise TransientError when it breaks.

        A stream silent for longer than SSE_SILENCE (keep-alives every 15 s) is dead.
        """
        resp = self.http.open("GET", self.base + "/api/v1/events?account=" + urllib.parse.quote(self.number, safe=""),
                              {"Accept": "text/event-stream"}, timeout=SSE_SILENCE)
        if resp.status != 200:
            resp.conn.close()
            if resp.status == 421:
                raise self.setup_error(self.host_refused())
            if resp.status == 400:
                raise self.setup_error("signal-cli does not serve the bridge's account signal.number %s (its events "
                                       "answered 400). Fix: register or link it in that signal-cli, or correct "
                                       "signal.number" % mask_phone(self.number))
            raise TransientError("signal-cli events answered %d" % resp.status)
        if on_open:
            on_open(resp)
        try:
            yield from parse_sse(resp, stop, lambda: self.http.quickack and arm_quickack(resp.sock))
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise TransientError("signal-cli event stream broke (%s)" % e.__class__.__name__) from e
        finally:
            resp.conn.close()


def parse_sse(stream, stop, before_read=None):
    """Yield the JSON of each ``receive`` event of a Server-Sent Events stream.

    *before_read* runs before each line is read (it re-arms TCP_QUICKACK: an
    event the JDK server writes in several pieces must not wait for our ACK).
    """
    event, data = None, []
    while not stop.is_set():
        if before_read:
            before_read()
        line = stream.readline(1 << 22)
        if not line:
            raise TransientError("signal-cli event stream ended")
        if not line.endswith(b"\n"):
            raise TransientError("signal-cli event line too long or cut")
        line = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if not line:
            if data and event in (None, "receive"):
                try:
                    yield json.loads("\n".join(data))
                except ValueError:
                    yield {"_unreadable": True}
            event, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def _rate_limited(results, message, number):
    """The error for rate-limited send results: wait retryAfterSeconds; a challenge token means a captcha."""
    waits = [r["retryAfterSeconds"] for r in results if isinstance(r.get("retryAfterSeconds"), int)
             and not isinstance(r.get("retryAfterSeconds"), bool) and r["retryAfterSeconds"] >= 0]
    wait = float(min(max(waits), 86400)) if waits else 60.0
    tokens = [r["token"] for r in results if isinstance(r.get("token"), str) and r["token"].strip()]
    if tokens:
        token = tokens[0].strip()[:200]
        step = ("solve a captcha at https://signalcaptchas.org/challenge/generate.html, copy the signalcaptcha:// link "
                "it opens, then run `signal-cli -a %s submitRateLimitChallenge --challenge %s --captcha "
                "'signalcaptcha://...'`" % (number, token))
        return CaptchaRequired("Signal wants a captcha before the bridge's number sends more (%s)" % message, token,
                               wait, step)
    return TransientError("signal-cli is rate limited (%s); waiting %.0f s" % (message, wait), wait)


def _rpc_error(err, number="NUMBER"):
    code, message = err.get("code"), shorten(str(err.get("message") or ""), 200)
    data = err.get("data") if isinstance(err.get("data"), dict) else {}
    response = data.get("response") if isinstance(data.get("response"), dict) else {}
    results = [r for r in response.get("results") or [] if isinstance(r, dict)]
    kinds = {r.get("type") for r in results}
    if code == -5 or kinds == {"RATE_LIMIT_FAILURE"}:
        return _rate_limited(results, message, number)
    if "NETWORK_FAILURE" in kinds or (code == -1 and "failed to send message" in message.lower()
                                      and not kinds & {"UNREGISTERED_FAILURE", "IDENTITY_FAILURE"}):
        return TransientError("signal-cli could not reach Signal (%s)" % message, 30.0)
    if kinds == {"UNREGISTERED_FAILURE"}:
        return PermanentError("the recipient is not registered on Signal (%s)" % message)
    if code == -4 or "untrusted" in message.lower():
        return IdentityError("signal-cli refuses: untrusted identity (%s)" % message)
    if code == -5 or "rate" in message.lower():
        return TransientError("signal-cli is rate limited (%s)" % message, 60.0)
    if code == -32603 and message.startswith("An internal server error has occurred"):
        # HttpServerHandler's catch-all: its JSON reader failed on this very request, e.g. a string over
        # Jackson's 20,000,000-character limit (an attachment over ~15 MB): sending it again cannot help
        e = PermanentError("signal-cli could not read the request (too large for its JSON reader?)")
        e.media = True
        return e
    if code == -32603 and re.search(r"AttachmentInvalidException|FileNotFoundException|No such file", message):
        e = PermanentError("signal-cli cannot read the attachment (%s)" % message)
        e.media = True
        return e
    if code in (-3, -32603):
        return TransientError("signal-cli failed (%s %s)" % (code, message))
    if "not registered" in message.lower() or "unregistered" in message.lower():
        return PermanentError("the recipient is not registered on Signal (%s)" % message)
    return PermanentError("signal-cli refused (%s %s)" % (code, message))


def _send_timestamp(result, to, number="NUMBER"):
    if isinstance(result, dict):
        for r in result.get("results") or []:
            if isinstance(r, dict) and r.get("type") not in (None, "SUCCESS"):
                t = r.get("type")
                if t == "IDENTITY_FAILURE":
                    raise IdentityError("untrusted identity of the recipient")
                if t == "UNREGISTERED_FAILURE":
                    raise PermanentError("the recipient is not registered on Signal")
                if t == "RATE_LIMIT_FAILURE" and not to.startswith("group:"):
                    raise _rate_limited([r], "rate limited", number)
                if not to.startswith("group:"):
                    raise TransientError("signal-cli send failed: %s" % t)
        ts = result.get("timestamp")
        if isinstance(ts, int) and not isinstance(ts, bool):
            return ts
    raise TransientError("signal-cli answered without a timestamp")


class SignalRestClient(SignalClient):
    """bbernhard/signal-cli-rest-api in any mode (signal-cli-rest-api.md)."""

    kind = "signal-cli-rest-api"

    def __init__(self, base_url, number, transport=None):
        super().__init__(base_url, number, transport)
        self.mode = None

    def call(self, method, path, body=None, stream=None):
        data = stream if stream is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        resp = self.http.request(method, self.base + path, hdrs, data)
        if resp.status in (200, 201, 204):
            self.answered()
            return _json_body(resp)
        msg = _json_body(resp)
        reason = shorten(str(msg.get("error") if isinstance(msg, dict) else resp.body[:200]), 200)
        low = reason.lower()
        if "not registered with json-rpc" in low:
            # json-rpc mode: its signal-cli daemon has no such account - ours, not the recipient (client.go)
            raise self.setup_error(
                "signal-cli-rest-api does not know the bridge's own number signal.number %s (\"%s\"). Fix: register or "
                "link it in signal-cli-rest-api and restart it, or correct signal.number; messages stay queued"
                % (mask_phone(self.number), shorten(reason, 60)))
        self.answered()
        tokens = msg.get("challenge_tokens") if isinstance(msg, dict) else None
        if resp.status == 429 and isinstance(tokens, list) and tokens and isinstance(tokens[0], str):
            step = ("solve a captcha at https://signalcaptchas.org/challenge/generate.html, then POST "
                    "{\"challenge_token\": \"%s\", \"captcha\": \"signalcaptcha://...\"} to %s/v1/accounts/%s/"
                    "rate-limit-challenge" % (tokens[0][:200], self.base, self.number))
            raise CaptchaRequired("Signal wants a captcha before the bridge's number sends more (%s)" % reason,
                                  tokens[0][:200], _retry_after(resp), step)
        if resp.status >= 500 or resp.status in (408, 429) or "rate limit" in low:
            raise TransientError("signal-cli-rest-api answered %d: %s" % (resp.status, reason), _retry_after(resp))
        if "untrusted" in low or "identity" in low:
            raise IdentityError("signal-cli-rest-api: untrusted identity (%s)" % reason)
        if "not registered" in low or "unregistered" in low:
            raise PermanentError("the recipient is not registered on Signal (%s)" % reason)
        if "failed to send message" in low or "network" in low:
            raise TransientError("signal-cli could not reach Signal (%s)" % reason, 30.0)
        raise PermanentError("signal-cli-rest-api refused (%d): %s" % (resp.status, reason))

    def _path(self, fmt):
        return fmt % urllib.parse.quote(self.number, safe="")

    @staticmethod
    def _to(to):
        if to.startswith("group:"):
            return "group." + base64.b64encode(to[6:].encode()).decode()
        return to

    def attachment_problem(self, att):
        """Never a problem: /v2/send writes attachments to files before signal-cli sees them (attachment.go)."""
        return None

    def about(self):
        about = self.call("GET", "/v1/about")
        self.mode = about.get("mode") if isinstance(about, dict) else None
        return self.mode

    def send(self, to, text, attachments=(), quote=None, edit_ts=None):
        body = {"number": self.number, "recipients": [self._to(to)], "message": text or ""}
        if quote:
            body.update(quote_timestamp=int(quote[0]), quote_author=quote[1])
            if quote[2]:
                body["quote_message"] = quote[2]
        if edit_ts:
            body["edit_timestamp"] = int(edit_ts)
        stream = None
        if attachments:
            body["base64_attachments"] = markers = attachment_markers(len(attachments))
            # signal-cli-rest-api splits the data URI at ";" and takes the name as it stands (attachment.go)
            stream = json_stream(body, list(attachments), markers, lambda name: name.replace(";", "_"))
        result = self.call("POST", "/v2/send", body, stream)
        if isinstance(result, list):           # master since 6a225e6: one object per underlying send
            errs = [e for r in result if isinstance(r, dict) for e in ((r.get("errors") or {}).get("recipients") or [])]
            for e in errs:
                if isinstance(e, dict) and e.get("reason") == "IDENTITY_FAILURE":
                    raise IdentityError("untrusted identity of the recipient")
                if isinstance(e, dict) and e.get("reason") == "UNREGISTERED_FAILURE":
                    raise PermanentError("the recipient is not registered on Signal")
            result = result[0] if result else None
        ts = result.get("timestamp") if isinstance(result, dict) else None
        try:
            return int(ts)
        except (TypeError, ValueError):
            raise TransientError("signal-cli-rest-api answered without a timestamp") from None

    def react(self, to, emoji, target_author, target_ts, remove=False):
        body = {"recipient": self._to(to), "reaction": emoji or "👍", "target_author": target_author,
                "timestamp": int(target_ts)}
        self.call("DELETE" if remove else "POST", self._path("/v1/reactions/%s"), body)

    def remote_delete(self, to, ts):
        self.call("DELETE", self._path("/v1/remote-delete/%s"), {"recipient": self._to(to), "timestamp": int(ts)})

    def trust(self, who):
        self.call("PUT", self._path("/v1/identities/%s/trust/") + urllib.parse.quote(who, safe=""),
                  {"trust_all_known_keys": True})

    @staticmethod
    def internal_group_id(rest_id):
        """``group.<base64(id)>`` (REST) -> signal-cli id (signal-cli-rest-api.md section 2)."""
        try:
            return base64.b64decode(rest_id[len("group."):]).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise TransientError("signal-cli-rest-api returned an unreadable group id") from None

    def create_group(self, name, members, description):
        r = self.call("POST", self._path("/v1/groups/%s"), {"name": name, "members": list(members),
                                                              "description": description, "group_link": "disabled"})
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise TransientError("signal-cli-rest-api created a group but returned no id")
        return self.internal_group_id(r["id"])

    def rename_group(self, group_id, name):
        self.call("PUT", self._path("/v1/groups/%s/") + urllib.parse.quote(self._to("group:" + group_id), safe=""),
                  {"name": name})

    def list_groups(self):
        out = []
        for g in self.call("GET", self._path("/v1/groups/%s")) or []:
            if isinstance(g, dict) and isinstance(g.get("internal_id"), str):
                members = [m if isinstance(m, str) else (m.get("number") or m.get("uuid"))
                           for m in g.get("members") or [] if isinstance(m, (str, dict))]
                out.append({"id": g["internal_id"], "name": g.get("name"), "description": g.get("description") or "",
                            "members": members})
        return out

    def get_attachment(self, att, max_bytes):
        att_id = att["id"]
        if not re.match(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", att_id) or ".." in att_id:
            raise PermanentError("attachment id refused")
        if isinstance(att.get("size"), int) and att["size"] > max_bytes:
            raise PermanentError("attachment over the size limit")
        data = self.http.request("GET", self.base + "/v1/attachments/" + urllib.parse.quote(att_id, safe=""))
        if data.status == 404:
            raise PermanentError("signal-cli-rest-api has no such attachment")
        if data.status != 200:
            raise TransientError("attachment download answered %d" % data.status)
        if len(data.body) > max_bytes:
            raise PermanentError("attachment over the size limit")
        return data.body

    def check(self):
        resp = self.http.request("GET", self.base + "/v1/health", timeout=3)
        if resp.status not in (200, 204):
            raise TransientError("signal-cli-rest-api /v1/health answered %d" % resp.status)

    def poll(self, timeout=1):
        """normal/native mode: fetch and consume what is waiting."""
        # a normal-mode receive runs a JVM signal-cli that may take long, and it consumes what it
        # fetched whether or not we are still listening: wait as long as the API itself may take
        resp = self.http.request("GET", self.base + self._path("/v1/receive/%s") + "?timeout=%d&max_messages=100" % timeout,
                                 timeout=timeout + 150)
        if resp.status != 200:
            raise TransientError("receive answered %d" % resp.status)
        try:
            items = json.loads(resp.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise TransientError("receive answered something that is not JSON") from None
        return items if isinstance(items, list) else []

    def events(self, stop, on_open=None):
        """json-rpc mode: yield receive objects from the WebSocket until it closes."""
        u = urllib.parse.urlsplit(self.base + self._path("/v1/receive/%s"))
        ws = WebSocket.connect(u, timeout=75.0)   # the server pings every 54 s
        if on_open:
            on_open(ws)
        try:
            while not stop.is_set():
                text = ws.recv()
                if text is None:
                    raise TransientError("signal-cli-rest-api closed the WebSocket")
                try:
                    yield json.loads(text)
                except ValueError:
                    yield {"_unreadable": True}
        except (OSError, ValueError) as e:
            raise TransientError("WebSocket broke (%s)" % e.__class__.__name__) from e
        finally:
            ws.close()


class WebSocket:
    """A minimal RFC 6455 client: handshake, masked frames, ping/pong, close."""

    def __init__(self, sock, rfile):
        self.sock = sock
        self.rfile = rfile
        self.lock = threading.Lock()

    @classmethod
    def connect(cls, u, timeout=60.0, rand=os.urandom):
        host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if u.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            key = base64.b64encode(rand(16)).decode()
            req = ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n") % (u.path or "/", u.netloc, key)
            sock.sendall(req.encode())
            rfile = sock.makefile("rb")
            status = rfile.readline(65536)
            headers = {}
            while True:
                line = rfile.readline(65536)
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
        except OSError as e:
            raise TransientError("cannot open the WebSocket (%s)" % e.__class__.__name__) from e
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if b" 101 " not in status or headers.get("sec-websocket-accept") != accept:
            sock.close()
            raise TransientError("WebSocket handshake refused (%s)" % status[:40].decode("latin-1", "replace").strip())
        return cls(sock, rfile)

    def send_frame(self, opcode, payload=b"", rand=os.urandom):
        mask = rand(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self.lock:
            self.sock.sendall(head + mask + masked)

    def _read(self, n):
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise ConnectionResetError("WebSocket closed mid-frame")
        return data

    def recv(self, limit=1 << 24):
        """Return the next text message, answering pings; None after a close frame."""
        parts = []
        while True:
            b1, b2 = self._read(2)
            opcode, n = b1 & 0x0F, b2 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if n > limit:
                raise ValueError("WebSocket frame too large")
            mask = self._read(4) if b2 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:
                self.send_frame(0xA, payload)
            elif opcode == 0x8:
                with contextlib.suppress(OSError):
                    self.send_frame(0x8, payload[:2])
                return None
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b1 & 0x80:
                    return b"".join(parts).decode("utf-8", "replace")

    def close(self):
        with contextlib.suppress(OSError):
            self.send_frame(0x8, struct.pack(">H", 1000))
        with contextlib.suppress(OSError):
            self.sock.close()

###############################################################################
# Bridge ######################################################################
###############################################################################

HELP_TEXT = """WhatSignal commands:
/chats - recent WhatsApp chats with their numbers
/to <n|+number|name> <text> - write to a chat (n from /chats) or start a new one
/status - bridge and WhatsApp session health
/reopen <chat> - groups layout: bring back a chat whose Signal group you left
/mute <chat> [30m|8h|2d|1w] - stop forwarding a chat (its messages are kept); /unmute <chat>, /muted
/deliver <chat> - send what a chat received while it was muted
/help - this text
Quote a forwarded message to answer its chat; a message without a quote goes to the chat of the last message forwarded to you."""

SESSION_ADVICE = {
    "STOPPED": "it was stopped; start it in WAHA (POST /api/sessions/{s}/start)",
    "FAILED": "restart it in WAHA; if that fails, log out and scan the QR code again",
    "SCAN_QR_CODE": "WhatsApp logged this device out; scan the QR code in WAHA again",
    "PASSKEY_REQUIRED": "WAHA needs a passkey confirmation",
    "PASSKEY_CONFIRMATION_REQUIRED": "WAHA needs a passkey confirmation",
    "STARTING": "it has been starting for over 5 minutes; restart it in WAHA (POST /api/sessions/{s}/restart)",
}


class MediaProblem(PermanentError):
    """Media that cannot be bridged; ``notice`` is what the owner reads instead."""

    def __init__(self, notice):
        super().__init__(notice)
        self.notice = notice


def media_label(mime):
    """What the owner reads for media of type *mime*: image, video, audio, sticker or document."""
    if mime == "image/webp":
        return "sticker"
    return {"image": "image", "video": "video", "voice": "audio", "file": "document"}[media_kind(mime)]


def media_kind(mime):
    """Return image, video, voice or file for a MIME type."""
    mime = (mime or "").lower()
    if mime.startswith("image/"):
        return "image"
    if mime.startswith("video/"):
        return "video"
    if mime.startswith("audio/"):
        return "voice"
    return "file"


MUTABLE_KINDS = ("message", "message.own", "message.reaction", "message.edited", "message.revoked",
                 "call.received", "call.rejected", "poll.vote")


def ignore_list(entries):
    """bridge.ignoreChats as (set of chat ids, set of lower-case names)."""
    ids, names = set(), set()
    for e in entries:
        e = e.strip()
        jid = phone_to_jid(e) if e.startswith("+") else normalize_jid(e) if "@" in e else None
        if jid:
            ids.add(jid)
        else:
            names.add(e.lower())
    return ids, names


class Intake:
    """Webhooks being taken in right now; the delivery workers give way to them.

    Intake and delivery share one interpreter.  When WAHA floods the bridge (a history sync after a
    re-login, a backlog after an outage), every delivery in between delays the answers WAHA is waiting
    for.  So while webhooks are in flight a delivery worker waits before its next item, at most *limit*
    seconds an item: delivery still moves during a flood and catches up when it ends.  At the rates one
    person's chats produce, nothing is in flight most of the time and nothing waits.
    """

    def __init__(self, limit=0.02, step=0.002, sleep=time.sleep, monotonic=time.monotonic):
        self.limit, self.step, self.sleep, self.monotonic = limit, step, sleep, monotonic
        self.flights = collections.deque()     # one entry a webhook in flight: appends and pops need no lock

    @property
    def active(self):
        return len(self.flights)

    def __enter__(self):
        self.flights.append(None)

    def __exit__(self, *exc):
        self.flights.pop()

    def give_way(self, stopping):
        """Wait while webhooks are in flight, at most *limit* seconds (or until *stopping* is set)."""
        if not self.active:
            return
        deadline = self.monotonic() + self.limit
        while self.active and not stopping.is_set() and self.monotonic() < deadline:
            self.sleep(self.step)


class Bridge:
    """Routing between one or more channels' WhatsApp chats and their owners' Signal.

    ``ingest_*`` validate and commit what arrives (webhook thread, receiver
    thread); ``process`` delivers one stored item (worker thread) and returns
    a function that records its mapping in the same transaction that marks it
    done.  Event handlers are ``_on_<waha event>`` and ``_sig_<envelope kind>``.
    """

    media_tries = 5   # a failing media download is retried this often, then a notice goes instead

    def __init__(self, config, store, waha, signal, log, metrics, clock=time.time, rand=random.random):
        self.config = config
        self.store = store
        self.waha = waha
        self.signal = signal
        self.log = log
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self.number = config.get("signal.number")
        self.max_media = config.get("media.maxSizeMB") * 1024 * 1024
        self.cache_dir = config.get("media.cacheDir")
        self.wake = {"w2s": threading.Event(), "s2w": threading.Event()}
        self.intake = Intake()    # webhooks in flight: delivery gives way to them
        self.names = {}   # (channel, jid) -> (name, looked up at): spares a query per message
        self._locks, self._locks_lock = {}, threading.Lock()   # one download per queued item at a time
        self._media_failed = {}   # queued item -> notice, for media that cannot come
        self._media_send_failures = {}   # queued item -> times signal-cli refused its media
        self.untrusted = set()   # channels whose owner's new identity key signal-cli does not trust yet
        self.captchas = set()    # rate-limit challenge tokens already reported
        self.warned_json_limit = False
        self.wake_media = threading.Event()
        self.layout = config.get("bridge.layout")
        self.catchup_wanted, self.wake_catchup = set(), threading.Event()
        self.catchup_lock = threading.Lock()    # want_catchup runs on handler threads, the worker takes the set
        self.ignore_ids, self.ignore_names = ignore_list(config.get("bridge.ignoreChats"))
        self.mute_cache = {}
        self.sent_ids, self.sent_order = set(), collections.deque(maxlen=2000)   # see _sent
        rate = config.get("bridge.groupCreatePerMinute") / 60.0
        self.group_bucket = TokenBucket(5, rate, clock)

    # -- intake ------------------------------------------------------------
    def ingest_webhook(self, event):
        """Validate and commit one WAHA event; return 'stored', 'duplicate', 'ignored' or 'stale' (too old).

        Raises PayloadError (400) or StoreError (503).
        """
        inbound = parse_waha_event(event)
        if inbound is None:
            return "ignored"
        if self.config.channel(inbound.session) is None:
            self.log.warn("webhook for an unknown WAHA session ignored", session=inbound.session[:40])
            return "ignored"
        when = event_time(event)
        if when is not None and when < self.clock() - self.config.get("retentionDays") * 86400 + STALE_MARGIN:
            # older than the dedupe memory: it may have been delivered and forgotten, so a replay is refused
            self.metrics.inc("whatsignal_rejected_total", reason="stale")
            self.log.warn("stale webhook ignored: older than retentionDays", event=inbound.kind,
                          age_days=round((self.clock() - when) / 86400, 1))
            return "stale"
        if inbound.chat in self.ignore_ids and inbound.kind in MUTABLE_KINDS:
            return "ignored"            # bridge.ignoreChats: not even stored
        return "stored" if self._commit(inbound) else "duplicate"

    def _commit(self, inbound, **extra):
        """Store one parsed WhatsApp event for delivery (webhook or catch-up); False if seen before."""
        record = dict(inbound.record, received_at=self.clock(), **extra)
        new = self.store.enqueue(inbound.session, "w2s", inbound.dedupe, inbound.chat, inbound.kind, record, self.clock())
        if new:
            self.wake["w2s"].set()
            if record.get("media"):
                self.wake_media.set()
        return new

    # -- catch-up ---------------------------------------------------------------
    def want_catchup(self, session):
        """Ask the catch-up worker for a pass over *session*."""
        with self.catchup_lock:
            self.catchup_wanted.add(session)
        self.wake_catchup.set()

    def take_catchups(self):
        """The sessions waiting for a catch-up pass, taken at once (none is lost to a concurrent request)."""
        with self.catchup_lock:
            wanted, self.catchup_wanted = self.catchup_wanted, set()
        return wanted

    def catch_up(self, channel, pause=lambda: False):
        """Read from WAHA what the webhooks missed since the last event stored for *channel*; return a summary.

        The chats active since then (newest first, at most bridge.catchUpMaxChats), and in each the
        newest bridge.catchUpMaxMessages messages since then, go through the same parsing and
        dedupe as webhooks, oldest first; the first new one of a chat carries the count, so the
        owner reads "3 messages while the bridge was offline:" once.  The first start has nothing
        stored: it remembers now and imports no history.  *pause* runs between WAHA calls and
        returns True to stop.  Raises UpstreamError when WAHA cannot answer.
        """
        s, g = channel.session, self.config.get
        now = self.clock()
        # the newest row, read backwards by row id (NOT INDEXED): O(1) where MAX(created_at) read every row of the
        # channel, 1.8 s at a million rows, at each start and each return of the session to WORKING
        last = self.store.one("SELECT created_at FROM queue NOT INDEXED WHERE channel=? AND direction='w2s'"
                              " ORDER BY id DESC LIMIT 1", (s,))
        mark = max(last[0] if last else 0.0, float(self.store.state(s, "catchup_mark") or 0.0))
        if not mark or not g("bridge.catchUpHours"):
            self.store.set_state(s, "catchup_mark", repr(now), now)
            return {"at": now, "first": True, "chats": 0, "recovered": 0}
        # never older than retention: what was delivered before that is forgotten and would come twice
        since = max(mark - CATCHUP_MARGIN, now - g("bridge.catchUpHours") * 3600,
                    now - g("retentionDays") * 86400 + CATCHUP_MARGIN)
        active, recovered, stopped = 0, 0, False
        for chat, ts in self.waha.recent_chats(s, g("bridge.catchUpMaxChats")):
            if ts is not None and ts < since:
                break                               # sorted by activity: the rest is older
            if chat.endswith(("@broadcast", "@newsletter")):
                continue
            stopped = pause()
            if stopped:
                break                               # shutting down: the next start reads this span again
            active += 1
            msgs = self.waha.chat_messages(s, chat, since, g("bridge.catchUpMaxMessages"))
            recovered += self._recover(s, msgs, since, more=len(msgs) >= g("bridge.catchUpMaxMessages"))
        if not stopped:
            self.store.set_state(s, "catchup_mark", repr(now), self.clock())
        if recovered:
            self.metrics.inc("whatsignal_catchup_recovered_total", recovered)
        self.log.info("catch-up done", session=s, chats=active, recovered=recovered)
        return {"at": now, "chats": active, "recovered": recovered}

    def _recover(self, session, msgs, since, more=False):
        """Commit the unseen ones of one chat's messages sent since *since*, oldest first; return how many were new.

        The time is checked here too: an engine that ignores filter.timestamp.gte must not bring back
        messages older than the dedupe memory.
        """
        def when(m):
            t = m.get("timestamp")
            if isinstance(t, dict) and isinstance(t.get("low"), int):     # NOWEB: a protobuf Long
                t = t["low"] % 2 ** 32 + t.get("high", 0) * 2 ** 32
            return t if isinstance(t, (int, float)) and not isinstance(t, bool) else 0
        fresh, own = [], self.config.get("bridge.mirrorOwnMessages")
        channel = self.config.channel(session)
        for m in sorted(msgs, key=when):
            if when(m) < since or (m.get("fromMe") is True and not own):
                continue
            try:    # messages read from WAHA carry no `source`: the bridge's own sends are known by their ids
                inbound = parse_waha_event({"event": "message.any", "session": session, "payload": m})
            except PayloadError as e:
                self.log.debug("catch-up skipped a message WAHA returned", reason=str(e)[:80])
                continue
            if inbound is None or self.store.one("SELECT 1 FROM queue WHERE channel=? AND direction='w2s' AND dedupe=?",
                                                 (session, self.store.tok("dedupe", inbound.dedupe))):
                continue
            if inbound.kind == "message.own" and self.echo(channel, inbound.record["bare"]):
                continue
            fresh.append(inbound)
        n = 0
        for i, inbound in enumerate(fresh):
            n += self._commit(inbound, recovered=True,
                              **({"catchup": len(fresh), "catchup_more": more} if i == 0 else {}))
        return n

    def owner_channel(self, number, uuid):
        """Return the channel whose owner sent an envelope from *number* / *uuid*, or None."""
        for ch in self.config.channels:
            if number is not None and number == ch.destination:
                if uuid and self.store.state(ch.session, "owner_uuid") != self.store.tok("uuid", uuid):
                    self.store.set_state(ch.session, "owner_uuid", self.store.tok("uuid", uuid), self.clock())
                return ch
            if number is None and uuid and self.store.state(ch.session, "owner_uuid") == self.store.tok("uuid", uuid):
                return ch
        return None

    def ingest_envelope(self, obj):
        """Validate one Signal receive object; commit it if the owner sent it. Return what happened."""
        try:
            env = parse_signal_envelope(obj)
        except PayloadError as e:
            self.metrics.inc("whatsignal_rejected_total", reason="envelope")
            self.log.warn("malformed signal envelope rejected", reason=str(e)[:120])
            return "rejected"
        if env.account is not None and env.account != self.number:
            return "ignored"       # a daemon without -a streams every account it serves
        if env.kind == "sync" or (env.number == self.number and env.number is not None):
            return "ignored"       # our own linked devices: never echoed back
        ch = self.owner_channel(env.number, env.uuid)
        if ch is None:
            self.metrics.inc("whatsignal_unauthorized_senders_total")
            self.log.warn("unauthorized sender ignored", sender=mask_phone(env.number) if env.number else "hidden number",
                          kind=env.kind)
            return "unauthorized"
        if env.kind == "untrusted":
            self.owner_key_changed(ch, "receive")
            return "held"
        if ch.session in self.untrusted:      # signal-cli delivers the owner's messages again: the key is trusted
            self.untrusted.discard(ch.session)
            self.tell_key_trusted(ch)
        if env.kind == "other" or (env.kind == "group-update" and self.layout != "groups"):
            return "ignored"
        record = {"kind": env.kind, "ts": env.ts, "fields": env.fields, "received_at": self.clock()}
        if env.kind in ("typing", "receipt"):      # never deduplicated: two in one millisecond are both real
            dedupe = "%s:%s:%s" % (ch.destination, env.kind, secrets.token_hex(8))
        else:                                       # the owner's devices and kinds may share a millisecond
            dedupe = "%s:%d:%s:%s" % (ch.destination, env.ts, env.device, env.kind)
            legacy = self.store.tok("dedupe", "%s:%d" % (ch.destination, env.ts))   # the key before schema 4
            if self.store.one("SELECT 1 FROM queue WHERE channel=? AND direction='s2w' AND dedupe=? AND kind=?",
                              (ch.session, legacy, env.kind)):
                return "duplicate"
        new = self.store.enqueue(ch.session, "s2w", dedupe, "~owner", env.kind, record, self.clock())
        if new:
            self.wake["s2w"].set()
        return "stored" if new else "duplicate"

    def owner_key_changed(self, channel, where):
        """signal-cli refuses the owner's new identity key (on send or on receive): one ERROR, trust if allowed."""
        self.metrics.inc("whatsignal_untrusted_identity_total")
        if channel.session not in self.untrusted:
            self.untrusted.add(channel.session)
            self.log.error("untrusted identity: the owner's Signal safety number changed; signal-cli holds the owner's "
                           "messages and the bridge keeps its own queued. Fix: verify it and run `signal-cli -a NUMBER "
                           "trust -a OWNER`, or set signal.trustNewIdentity", where=where)
        if not self.config.get("signal.trustNewIdentity"):
            return False
        try:
            self.signal.trust(channel.destination)
        except UpstreamError as e:
            self.log.warn("could not trust the owner's new safety number yet", reason=scrub(e))
            return False
        self.log.warn("trusted the owner's new safety number (signal.trustNewIdentity)")
        self.untrusted.discard(channel.session)
        self.tell_key_trusted(channel)
        return True

    def captcha_required(self, channel, e):
        """Once per challenge: an ERROR with the exact step, and a notice to the owner's control conversation."""
        if e.token in self.captchas:
            return
        if len(self.captchas) > 100:
            self.captchas.clear()
        self.captchas.add(e.token)
        self.log.error("Signal rate-limits the bridge's number and wants a captcha; messages stay queued until it is "
                       "solved. Fix: " + e.step)
        try:
            self.notify(channel, "Signal asks the bridge's number to solve a captcha before it sends more; your "
                                 "messages wait until then. The bridge's log has the one command to run.")
        except UpstreamError as err:
            self.log.warn("could not tell the owner about the captcha", reason=scrub(err))

    def tell_key_trusted(self, channel):
        try:
            self.notify(channel, "Your Signal safety number changed and is now trusted by this bridge; messages flow "
                                 "again. If you did not change phones or reinstall Signal, check the bridge.")
        except UpstreamError as e:
            self.log.warn("could not tell the owner that the new safety number is trusted", reason=scrub(e))

    # -- delivery -------------------------------------------------------------
    def process(self, direction, row):
        """Deliver one stored item; return None or a function run in the 'done' transaction."""
        rec = self.store.record_of(row)
        channel = self.config.channel(row["channel"])
        if channel is None:
            raise PermanentError("channel %s is no longer configured" % row["channel"])
        if direction == "w2s":
            handler = getattr(self, "_on_" + row["kind"].replace(".", "_"))
            if row["kind"] in MUTABLE_KINDS and rec.get("chat"):
                chat = self.resolve_jid(channel, rec["chat"])
                if self.ignored(channel, chat):
                    return None
                if self.muted(channel, chat) or self.muted(channel, rec["chat"]):
                    raise Muted("chat muted")
        else:
            handler = getattr(self, "_sig_" + row["kind"].replace("-", "_"), None)
            if handler is None:
                return None
        return handler(channel, rec, row)

    def _map(self, channel, direction, chat, wa_id, sig_ts, author, name=None, conv=None, sender=None):
        """The 'done' transaction's work: the mapping, and the chat's place in /chats."""
        now = self.clock()

        def record(db):
            self.store.add_mapping(db, channel.session, direction, chat, wa_id, sig_ts, author, now, conv, sender)
            self.store.touch_chat(channel.session, chat, now, name=name, db=db)
        return record

    def notify(self, channel, text, quote=None):
        """Send a bridge notice to the owner's Signal; return its timestamp."""
        return self.signal.send(channel.destination, text, quote=quote)

    def resolve_jid(self, channel, jid):
        """Map a ``@lid`` id to its phone-number id (cached); other ids pass through."""
        if not jid or not jid.endswith("@lid"):
            return jid
        known, pn = self.store.lid(channel.session, jid)
        if not known:
            try:
                pn = self.waha.lid_to_pn(channel.session, jid)
            except UpstreamError as e:
                self.log.debug("lid lookup failed", reason=str(e)[:80])
                return jid
            self.store.set_lid(channel.session, jid, pn, self.clock())
        return pn or jid

    def display_name(self, channel, jid, push=None, group=False):
        """A group's name, a person's name in the owner's contacts, else ``~push name (+number)``, else the number.

        Names come from WAHA, cached a day as ``=saved``, ``~push`` or ``-`` (WAHA has none; an
        unmarked entry, from an older release, is looked up again).  A name the person chose
        (WhatsApp's push name) is shown marked, as WhatsApp shows it, so that nobody outside the
        owner's contacts can look like someone in them.
        """
        key = (channel.session, jid)
        cached, at = self.names.get(key) or self.store.contact(channel.session, jid)
        now = self.clock()
        if not at or not 0 <= now - at <= CONTACT_TTL or (cached or "")[:1] not in ("=", "~", "-"):
            try:
                if group:
                    looked = clean_name(self.waha.group_name(channel.session, jid))
                    looked = "=" + looked if looked else "-"
                else:
                    saved, their = self.waha.contact_name(channel.session, jid)
                    looked = "=" + saved if saved else "~" + their if their else "-"
                cached, at = looked, now
                self.store.set_contact(channel.session, jid, cached, now)
            except UpstreamError as e:
                self.log.debug("contact lookup failed", reason=scrub(e, 80))
                cached = cached if (cached or "")[:1] in ("=", "~") else None
        if len(self.names) > 5000:
            self.names.clear()
        self.names[key] = (cached, at)
        if cached and cached[0] == "=":
            return cached[1:]
        number = jid_to_phone(jid) or (jid.split("@")[0] if jid else "someone")
        if group:
            return number
        push = clean_name(push) or (cached[1:] if (cached or "")[:1] == "~" else None)
        return "~%s (%s)" % (push, number if jid_to_phone(jid) else "hidden number") if push else number

    # WhatsApp -> Signal -----------------------------------------------------
    def _on_message(self, channel, rec, row):
        own = row["kind"] == "message.own"
        if own and self.echo(channel, rec["bare"]):
            return None
        if own and not rec.get("source") and not row["attempts"]:
            # no source (read back by catch-up, or an old WAHA): if the bridge sent it, its answer may still
            # be on the way back from WAHA; look again shortly, when the id is known
            raise HeldError("own message without a source; checked again for an echo", 2.0)
        chat = self.resolve_jid(channel, rec["chat"])
        group = chat.endswith("@g.us")
        sender = self.resolve_jid(channel, rec["sender"]) if group else chat
        name = self.display_name(channel, sender, None if own else rec.get("push"))
        group_name = self.display_name(channel, chat, group=True) if group else None
        quote, inline = None, None
        reply = rec.get("reply")
        if reply and reply.get("id"):
            m = self.store.by_wa(channel.session, reply["id"], chat)
            if m and m["sig_ts"]:
                quote = (m["sig_ts"], m["sig_author"], shorten(reply.get("body") or "", 200) or None)
            else:
                inline = reply.get("body") or "a message"
        conv = None
        if self.layout == "groups":
            conv = self.ensure_group(channel, chat, (group_name + " (WhatsApp)") if group else name)
        if rec.get("body") and "@" in rec["body"]:
            rec = dict(rec, body=self.named_mentions(channel, rec["body"], rec.get("mentions") or []))
        if rec.get("view_once"):        # "view-once photo from Alice: open it on your phone"
            rec = dict(rec, body="view-once %s%s: open it on your phone" % (
                rec["view_once"], "" if own else " from " + name + (" in " + group_name if group and not conv else "")))
        attachments, notice = [], None
        if rec.get("media"):
            try:
                attachments.append(self.fetch_media(rec["media"], row))
            except MediaProblem as e:
                notice = e.notice
        fetched = list(attachments)
        if attachments:
            why = self.signal.attachment_problem(attachments[0])
            if why:          # it can never succeed: tell the owner now rather than block the chat
                notice, attachments = self._media_notice(attachments[0], why), []
                if not self.warned_json_limit:
                    self.warned_json_limit = True
                    self.log.warn("media over signal-cli's JSON-RPC limit (about 15 MB) went as a notice. Fix: set "
                                  "signal.attachmentDir to a directory signal-cli can read at the same path")

        def render(notice):
            if own:    # what the owner wrote on the phone: "You → Alice Example: text", "You: text" in its group
                text = render_for_signal(rec, "You" if conv else "You → " + (group_name or name), None, inline, notice)
            elif rec.get("view_once"):
                text = render_for_signal(rec, name, None, inline, notice, prefix=False)
            elif conv:
                text = render_for_signal(rec, name, None, inline, notice, prefix=group)
            else:
                text = render_for_signal(rec, name, group_name, inline, notice)
            return catchup_header(rec) + text
        if own:
            sender = None
        try:
            ts = self.signal.send(self.to(channel, conv), render(notice), attachments, quote)
        except (MediaRefused, TransientError) as e:
            if not attachments or not self._media_send_hopeless(row, e):
                raise
            self.log.warn("signal-cli does not take this media; its text goes with a notice instead", item=row["id"],
                          reason=scrub(e))
            notice, attachments = self._media_notice(attachments[0], "could not be sent to Signal"), []
            ts = self.signal.send(self.to(channel, conv), render(notice), [], quote)
        self._media_send_failures.pop(row["dedupe"], None)
        if rec.get("poll"):            # its options, for a vote quoted from Signal (sealed: message content)
            self.store.set_state(channel.session, "poll:" + self.store.tok("msg", rec["bare"]), json.dumps(rec["poll"]),
                                 self.clock(), sealed=True)
        if fetched:                    # kept for retries until sent; private content does not linger
            with self._media_lock(row["dedupe"]):
                for a in fetched:
                    self._remove(a.path)
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="media" if attachments else "text",
                         result="ok")
        return self._map(channel, "w2s", chat, rec["id"], ts, self.number, name=group_name or name, conv=conv,
                         sender=sender)

    def _media_notice(self, att, why):
        size = human_size(os.path.getsize(att.path)) if os.path.exists(att.path) else None
        return ", ".join(x for x in (media_label(att.mime), size, why) if x)

    def _media_send_hopeless(self, row, e):
        """True when sending this item's media should stop: refused, or failing at signal-cli too often.

        Only errors signal-cli itself answered count: an outage or a rate limit says nothing about the media.
        """
        if isinstance(e, MediaRefused):
            return True
        if type(e) is not TransientError or not getattr(e, "answered", False):
            return False
        n = self._media_send_failures.get(row["dedupe"], 0) + 1
        if len(self._media_send_failures) > 1000:
            self._media_send_failures.clear()
        self._media_send_failures[row["dedupe"]] = n
        return n >= self.media_tries

    def _on_message_own(self, channel, rec, row):
        """The owner's own message from the phone or a linked device (``message.any``), mirrored like a
        forwarded one: it then is the latest thing in the conversation, so an unquoted answer goes to its
        chat only while nothing newer came."""
        if not self.config.get("bridge.mirrorOwnMessages"):
            return None
        return self._on_message(channel, rec, row)

    def named_mentions(self, channel, text, mentions):
        """WhatsApp's ``@<number>`` mentions in *text* shown as ``@Name`` (the mentioned ids, else numbers)."""
        ids = {j.split("@")[0]: j for j in mentions}

        def name(m):
            digits = m.group(1)
            jid = ids.get(digits) or (digits + "@c.us" if not mentions else None)
            if jid is None:
                return m.group(0)
            return "@" + self.display_name(channel, self.resolve_jid(channel, jid))
        return re.sub(r"@(\d{6,20})\b", name, text)

    def whatsapp_mentions(self, channel, chat, text):
        """The owner's ``@Name`` in a group chat as WhatsApp mentions: (text with ``@<number>``, mentioned ids).

        A name matches a participant's display name, or its first word, case-insensitively; it becomes a
        mention only when exactly one participant has it.
        """
        if not chat.endswith("@g.us") or "@" not in text:
            return text, []
        try:
            people = self.waha.participants(channel.session, chat)[:256]
        except UpstreamError as e:
            self.log.debug("group participants lookup failed", reason=scrub(e, 80))
            return text, []
        names = []
        for jid in people:
            full = self.display_name(channel, self.resolve_jid(channel, jid)).lower()
            names.extend((n, jid) for n in {full, full.split(" ")[0]} if n and not n.startswith("+"))
        out, mentions, i = [], [], 0
        while i < len(text):
            if text[i] == "@":
                rest = text[i + 1:].lower()
                hits = [(n, j) for n, j in names if rest.startswith(n) and not rest[len(n):len(n) + 1].isalnum()]
                if hits:
                    longest = max(len(n) for n, _ in hits)
                    who = {j for n, j in hits if len(n) == longest}
                    if len(who) == 1:
                        jid = who.pop()
                        out.append("@" + jid.split("@")[0])
                        if jid not in mentions:
                            mentions.append(jid)
                        i += 1 + longest
                        continue
            out.append(text[i])
            i += 1
        return "".join(out), mentions

    # -- mute and ignore -------------------------------------------------------------
    def ignored(self, channel, chat):
        """True for a chat in bridge.ignoreChats, by id or by its exact name."""
        if chat in self.ignore_ids:
            return True
        return bool(self.ignore_names) and \
            self.display_name(channel, chat, group=chat.endswith("@g.us")).lower() in self.ignore_names

    def mutes(self, channel):
        """{chat: until (Unix time, None for ever)} of the channel's muted chats (sealed: it names people)."""
        if channel.session not in self.mute_cache:      # read once: it is asked for every delivered item
            self.mute_cache[channel.session] = json.loads(self.store.state(channel.session, "muted", sealed=True) or "{}")
        return dict(self.mute_cache[channel.session])

    def muted(self, channel, chat):
        until = self.mutes(channel).get(chat, False)
        return until is None or (until is not False and until > self.clock())

    def _set_mute(self, channel, chat, until, remove=False):
        mutes = self.mutes(channel)
        mutes = {c: u for c, u in mutes.items() if u is None or u > self.clock()}   # expired ones go
        if remove:
            mutes.pop(chat, None)
        else:
            mutes[chat] = until
        self.store.set_state(channel.session, "muted", json.dumps(mutes), self.clock(), sealed=True)
        self.mute_cache[channel.session] = mutes

    def held_while_muted(self, channel, chat):
        """Items of *chat* (and its other id form) kept while it was muted."""
        toks = [self.store.tok("chat", c) for c in self._forms(channel, chat)]
        return self.store.one("SELECT COUNT(*) FROM queue WHERE channel=? AND state='muted' AND " + ENDED +
                              " AND chat IN (%s)" % ",".join("?" * len(toks)), [channel.session] + toks)[0]

    def _forms(self, channel, chat):
        """A chat's id forms the bridge has seen: the id, and @lid ids that resolve to it."""
        forms = {chat}
        for c in self.store.all_chats(channel.session):
            if c["chat"].endswith("@lid") and self.resolve_jid(channel, c["chat"]) == chat:
                forms.add(c["chat"])
        return sorted(forms)

    def _line(self, channel, chat, text, title, quote=None):
        """Send one bridge line about *chat* where its messages go; recorded so an unquoted answer goes there."""
        conv = None
        if self.layout == "groups":
            conv = self.ensure_group(channel, chat, title + (" (WhatsApp)" if chat.endswith("@g.us") else ""))
        ts = self.signal.send(self.to(channel, conv), text, quote=quote)
        return self._map(channel, "w2s", chat, None, ts, self.number, name=title, conv=conv)

    def poll_of(self, channel, bare):
        """The options of a poll the bridge forwarded ({name, options, multi}), else None."""
        raw = self.store.state(channel.session, "poll:" + self.store.tok("msg", bare), sealed=True)
        return json.loads(raw) if raw else None

    def _on_poll_vote(self, channel, rec, row):
        chat = self.resolve_jid(channel, rec["chat"])
        name, group_name = self._names(channel, chat, rec["sender"])
        m = self.store.by_wa(channel.session, rec["poll_bare"], chat)
        quote = (m["sig_ts"], m["sig_author"], None) if m and m["sig_ts"] else None
        who = name + (" in " + group_name if group_name and not quote and self.layout != "groups" else "")
        text = "%s voted: %s" % (who, ", ".join(rec["options"])) if rec["options"] else "%s withdrew their vote" % who
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="vote", result="ok")
        return self._line(channel, chat, text, group_name or name, quote)

    def _on_call_received(self, channel, rec, row):
        chat = self.resolve_jid(channel, rec["chat"])
        name = self.display_name(channel, chat, group=chat.endswith("@g.us"))
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="call", result="ok")
        return self._line(channel, chat, "📞 %s is calling you on WhatsApp (%s)"
                          % (name, "video" if rec["video"] else "voice"), name)

    def _on_call_accepted(self, channel, rec, row):
        self.store.set_state(channel.session, "call:" + self.store.tok("call", rec["call"]), "accepted", self.clock())
        return None

    def _on_call_rejected(self, channel, rec, row):
        """The call ended without being answered here (GOWS: rejected, or terminated but not elsewhere)."""
        if self.store.state(channel.session, "call:" + self.store.tok("call", rec["call"])) == "accepted":
            return None
        chat = self.resolve_jid(channel, rec["chat"])
        name = self.display_name(channel, chat, group=chat.endswith("@g.us"))
        return self._line(channel, chat, "📞 Missed call from %s on WhatsApp (%s)"
                          % (name, "video" if rec["video"] else "voice"), name)

    def echo(self, channel, bare):
        """True when the WhatsApp message *bare* is one this bridge sent (its send answer or its mapping)."""
        if bare in self.sent_ids:
            return True
        m = self.store.by_wa(channel.session, bare)
        return bool(m and m["direction"] == "s2w")

    def _sent(self, wa_id):
        """Remember an id the bridge sent at once, before its mapping is recorded (message.any may be first)."""
        if wa_id:
            if len(self.sent_order) == self.sent_order.maxlen:
                self.sent_ids.discard(self.sent_order[0])
            self.sent_order.append(bare_msg_id(wa_id))
            self.sent_ids.add(bare_msg_id(wa_id))

    def fetch_media(self, media, row, prefetch=False):
        """Download WhatsApp media into the cache under a generated name; return a SignalAttachment.

        Raises MediaProblem (the notice to send instead) or TransientError (retry).
        """
        mime = (media.get("mimetype") or "application/octet-stream").split(";")[0].strip().lower()
        kind = media_label(mime)
        limit = "%d MB" % (self.max_media // (1024 * 1024))
        if media.get("error") or not media.get("url"):
            raise MediaProblem("%s, not downloaded by WhatsApp's server" % kind)
        try:
            self.waha.check_media_url(media["url"])
        except PermanentError:
            self.metrics.inc("whatsignal_rejected_total", reason="media_url")
            self.log.warn("media URL refused: not on WAHA's origin", host=urllib.parse.urlsplit(media["url"]).hostname)
            raise MediaProblem("%s, refused: it was not offered by WAHA" % kind) from None
        make_private_dir(self.cache_dir)
        path = self.media_path(row, mime)      # our name for it: nothing from the payload
        key = row["dedupe"]
        with self._media_lock(key):
            legacy = os.path.join(self.cache_dir, "m-%s%s" % (row["dedupe"], EXTENSIONS.get(mime, ".bin")))
            if not os.path.exists(path) and os.path.exists(legacy):
                os.replace(legacy, path)        # prefetched before schema 5, under its dedupe token
            if key in self._media_failed:       # the prefetcher already met a lasting problem
                raise MediaProblem(self._media_failed[key])
            if prefetch and self.store.one("SELECT state FROM queue WHERE id=?", (row["id"],))[0] != "pending":
                return None                     # delivered meanwhile: do not bring the file back
            if not os.path.exists(path):
                try:
                    self._download(media, mime, kind, limit, path, row)
                except MediaProblem as e:
                    if len(self._media_failed) > 1000:
                        self._media_failed.clear()
                    self._media_failed[key] = e.notice
                    raise
        return SignalAttachment(mime, safe_filename(media.get("filename"), mime), path)

    def media_path(self, row, mime):
        """The cache file of a queued item, named after its row id and arrival time.

        Unique for ever (a row id alone can be reused after the newest row is deleted), and unchanged by
        rotate-key, which changes every token.  Nothing of the payload goes into it.
        """
        return os.path.join(self.cache_dir, media_name(row) + EXTENSIONS.get(mime, ".bin"))

    def drop_media(self, row):
        """Delete the cache file of an item that has left the queue (sent, dead or expired)."""
        try:
            if not self.store.record_of(row).get("media"):
                return      # only an item with media has cache files: spares ~24 failing unlink calls per message
        except (CryptoError, ValueError):
            pass            # unreadable: remove whatever could be there
        with self._media_lock(row["dedupe"]):
            for ext in set(EXTENSIONS.values()) | {".bin"}:
                for name in (media_name(row) + ext, media_name(row) + ext + ".part"):
                    self._remove(os.path.join(self.cache_dir, name))

    @contextlib.contextmanager
    def _media_lock(self, key):
        """One download per queued item at a time (prefetcher and delivery worker)."""
        with self._locks_lock:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_lock:
                entry[1] -= 1
                if not entry[1]:
                    self._locks.pop(key, None)

    def _download(self, media, mime, kind, limit, path, row):
        part = path + ".part"
        try:
            _, size = self.waha.download(media["url"], part, self.max_media)
            with open(part, "rb") as f:
                head = f.read(16)
            if not media_type_ok(mime, head):
                raise MediaProblem("%s, content does not match its type; not forwarded" % kind)
            os.replace(part, path)
        except MediaProblem:
            self._remove(part)
            raise
        except PermanentError as e:
            self._remove(part)
            if "redirects elsewhere" in str(e):
                self.metrics.inc("whatsignal_rejected_total", reason="media_url")
                self.log.warn("media URL refused: WAHA redirected it elsewhere")
                raise MediaProblem("%s, refused: it was not offered by WAHA" % kind) from None
            m = re.search(r"size (\d+) over limit", str(e))
            if m:
                raise MediaProblem("%s, %s, over the %s limit" % (kind, human_size(int(m.group(1))), limit)) from None
            raise MediaProblem("%s, %s" % (kind, "expired on WhatsApp's server" if "expired" in str(e)
                                           else "could not be downloaded")) from None
        except TransientError:
            self._remove(part)
            if row["attempts"] + 1 >= self.media_tries:
                raise MediaProblem("%s, could not be downloaded" % kind) from None
            raise

    @staticmethod
    def _remove(path):
        with contextlib.suppress(OSError):
            os.remove(path)

    def _on_message_reaction(self, channel, rec, row):
        chat = self.resolve_jid(channel, rec["chat"])
        m = self.store.by_wa(channel.session, rec["target_bare"], chat, strict=True)
        key = "reaction:" + self.store.tok("msg", rec["target_bare"])
        if m and m["sig_ts"]:
            emoji = rec["emoji"] or self.store.state(channel.session, key, sealed=True) or "👍"
            self.signal.react(self.to(channel, m["conv"]), emoji, m["sig_author"], m["sig_ts"], remove=not rec["emoji"])
            self.store.set_state(channel.session, key, rec["emoji"], self.clock(), sealed=True)
        elif rec["emoji"]:
            who = self.display_name(channel, self.resolve_jid(channel, rec["sender"]))
            self.notify(channel, "%s reacted %s to a message" % (who, rec["emoji"]))
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="reaction", result="ok")
        return None

    def _names(self, channel, chat, sender, push=None):
        """(sender name, group name or None) for a chat and its (resolved) sender."""
        group = chat.endswith("@g.us")
        sender = self.resolve_jid(channel, sender) if group and sender else chat
        return (self.display_name(channel, sender, push),
                self.display_name(channel, chat, group=True) if group else None)

    def _on_message_edited(self, channel, rec, row):
        chat = self.resolve_jid(channel, rec["chat"])
        m = self.store.by_wa(channel.session, rec["target_bare"], chat, strict=True)
        sender = self.resolve_jid(channel, rec.get("sender") or chat)
        name, group_name = self._names(channel, chat, sender, rec.get("push"))
        if m and m["sender_tok"] and m["sender_tok"] != self.store.tok("jid", sender):
            self.metrics.inc("whatsignal_rejected_total", reason="edit_not_by_author")
            self.log.warn("edit from someone other than the message's author ignored")
            return None
        if m and m["sig_ts"] and m["direction"] == "w2s":
            if m["conv"]:
                text = render_for_signal({"body": rec["body"]}, name, prefix=chat.endswith("@g.us"))
            else:
                text = render_for_signal({"body": rec["body"]}, name, group_name)
            self.signal.send(self.to(channel, m["conv"]), text, edit_ts=m["sig_ts"])
        else:
            who = name + (" in " + group_name if group_name else "")
            self.notify(channel, "%s edited a message: %s" % (who, rec["body"]))
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="edit", result="ok")
        return None

    def _on_message_revoked(self, channel, rec, row):
        chat = self.resolve_jid(channel, rec["chat"])
        m = self.store.by_wa(channel.session, rec["target_bare"], chat, strict=True)
        name = self.display_name(channel, chat, group=chat.endswith("@g.us"))
        if m and m["sig_ts"] and m["direction"] == "w2s":
            if self.config.get("whatsapp.mirrorDeletes"):
                self.signal.remote_delete(self.to(channel, m["conv"]), m["sig_ts"])
            else:
                self.signal.send(self.to(channel, m["conv"]), "%s deleted this message on WhatsApp" % name,
                                 quote=(m["sig_ts"], m["sig_author"], None))
        else:
            self.notify(channel, "%s deleted a message on WhatsApp" % name)
        self.metrics.inc("whatsignal_messages_processed_total", direction="w2s", kind="delete", result="ok")
        return None

    def _on_message_ack(self, channel, rec, row):
        self.store.set_ack(channel.session, rec["bare"], rec["ack"])
        return None

    _on_message_ack_group = _on_message_ack

    def _on_session_status(self, channel, rec, row):
        status, s = rec["status"], channel.session
        alerted = self.store.state(s, "session_alerted")   # the down state the owner was told about
        now = self.clock()
        stuck = bool(rec.get("stuck")) and status == "STARTING"
        if status == "WORKING" and self.store.state(s, "session_status") not in (None, "WORKING"):
            self.want_catchup(s)        # back from a gap in which WAHA's webhooks may have given up
        if status == "WORKING" and alerted:
            self.notify(channel, "WhatsApp session %s is working again." % s)
            self.store.set_state(s, "restart_attempts", "0", now)
            self.store.set_state(s, "session_alerted", "", now)
        elif (status in SESSION_DOWN or stuck) and status != alerted:
            advice = SESSION_ADVICE.get(status, "check WAHA").replace("{s}", s)
            self.notify(channel, "WhatsApp session %s is %s: %s. Messages to WhatsApp wait until it is back."
                        % (s, status, advice))
            self.store.set_state(s, "session_alerted", status, now)
        if (status in ("FAILED", "STOPPED") or stuck) and self.config.get("whatsapp.sessionAutoRestart"):
            self._auto_restart(channel, now)
        if status != "STARTING":
            self.store.set_state(s, "starting_since", "", now)
        elif not self.store.state(s, "starting_since"):
            self.store.set_state(s, "starting_since", str(now), now)
        self.store.set_state(s, "session_status", status, now)
        self.log.info("whatsapp session status", session=s, status=status)
        return None

    def poll_session(self, channel):
        """Read the session's status from WAHA; queue what the bridge missed, or a session stuck STARTING.

        session.status webhooks are lost when WAHA or the bridge restarts at the wrong moment.
        """
        s, now = channel.session, self.clock()
        try:
            status = self.waha.session_status(s)
        except UpstreamError as e:
            self.log.debug("session status poll failed", session=s, reason=scrub(e, 80))
            return None
        if status not in SESSION_DOWN + ("WORKING", "STARTING"):
            return status
        known, since = self.store.state(s, "session_status"), self.store.state(s, "starting_since")
        record = {"status": status, "polled": True, "received_at": now}
        if status == "STARTING" and since and now - float(since) > STARTING_STUCK_SECONDS:
            record["stuck"] = True
            key = "s:stuck:%d" % (now // SESSION_POLL_SECONDS)
        elif status in SESSION_DOWN and status != known or status == "WORKING" and self.store.state(s, "session_alerted"):
            key = "s:poll:%s:%d" % (status, now)
        else:                   # nothing to tell anyone: only remember it
            if status != known:
                self.store.set_state(s, "session_status", status, now)
            if status == "STARTING" and not since or status != "STARTING" and since:
                self.store.set_state(s, "starting_since", str(now) if status == "STARTING" else "", now)
            return status
        if self.store.enqueue(s, "w2s", key, "~session", "session.status", dict(record, event="session.status"), now):
            self.wake["w2s"].set()
        return status

    def _auto_restart(self, channel, now):
        s = channel.session
        attempts = int(self.store.state(s, "restart_attempts", "0"))
        if now < float(self.store.state(s, "restart_next_at", "0")):
            return
        self.store.set_state(s, "restart_attempts", str(attempts + 1), now)
        self.store.set_state(s, "restart_next_at", str(now + next_backoff(attempts, 30, 2, 3600, self.rand)), now)
        try:
            self.waha.restart_session(s)
            self.store.set_state(s, "starting_since", str(now), now)   # a restarted session gets its 5 minutes again
            self.notify(channel, "WhatSignal asked WAHA to restart session %s (attempt %d)." % (s, attempts + 1))
        except UpstreamError as e:
            self.notify(channel, "WhatSignal could not restart session %s: %s" % (s, shorten(str(e), 120)))

    # groups layout ---------------------------------------------------------
    @staticmethod
    def to(channel, conv):
        """Signal recipient of a conversation: the owner's 1:1 (None) or ``group:<id>``."""
        return "group:" + conv if conv else channel.destination

    def ensure_group(self, channel, chat, title):
        """Return the Signal group id of *chat*, creating it (paced, crash-safe) when needed.

        Raises HeldError while the owner has left the chat's group, TransientError
        while group creation is paced or failing.
        """
        g = self.store.group_of_chat(channel.session, chat)
        now = self.clock()
        if g and g["state"] == "active":
            if title and g["name"] != title and not 0 <= now - g["renamed_at"] < 86400:
                try:
                    self.signal.rename_group(g["group"], title)
                    self.store.save_group(channel.session, chat, now, "active", g["tag"], g["group"], title, renamed=True)
                except TransientError:
                    pass                      # tried again with the next message
                except UpstreamError as e:    # cosmetic: never costs the message; tried again in a day
                    self.log.warn("renaming a Signal group failed", reason=scrub(e, 120))
                    self.store.save_group(channel.session, chat, now, "active", g["tag"], g["group"], g["name"], renamed=True)
            return g["group"]
        if g and g["state"] == "left":
            raise HeldError("the owner left this chat's Signal group; " + HELD_REASON, 3600.0)
        if g and g["state"] == "creating":   # a crash between creating the group and recording it
            found = next((x for x in self.signal.list_groups() if g["tag"] in x["description"]), None)
            if found:
                self.store.save_group(channel.session, chat, now, "active", g["tag"], found["id"], title, renamed=True)
                return found["id"]
        wait = self.group_bucket.take()
        if wait:
            raise TransientError("pacing Signal group creation", wait)
        tag = g["tag"] if g else secrets.token_hex(6)
        self.store.save_group(channel.session, chat, now, "creating", tag, name=title)
        description = "WhatSignal: WhatsApp chat bridged here (%s). Write here to answer it." % tag
        gid = self.signal.create_group(title or "WhatsApp chat", [channel.destination], description)
        self.store.save_group(channel.session, chat, now, "active", tag, gid, title, renamed=True)
        self.log.info("created a Signal group for a WhatsApp chat", chat_kind="group" if chat.endswith("@g.us") else "person")
        return gid

    def _sig_group_update(self, channel, rec, row):
        g = self.store.chat_of_group(channel.session, rec["fields"]["group"])
        if g is None or g["state"] != "active":
            return None
        info = next((x for x in self.signal.list_groups() if x["id"] == g["group"]), None)
        if info is not None and channel.destination not in info["members"]:
            self.store.save_group(channel.session, g["chat"], self.clock(), "left", g["tag"], g["group"], g["name"])
            self.notify(channel, "You left the Signal group %r. Its WhatsApp messages are held; /reopen %s brings "
                        "the chat back." % (g["name"], g["name"] or "<chat>"))
        return None

    # Signal -> WhatsApp -----------------------------------------------------
    def _sig_message(self, channel, rec, row):
        f = rec["fields"]
        text = (f.get("text") or "").strip()
        if f.get("group"):
            g = self.store.chat_of_group(channel.session, f["group"])
            if g is None:
                self.log.info("owner message in a Signal group the bridge does not manage; ignored")
                return None
            reply_to = None
            if f.get("quote"):
                m = self.store.by_sig(channel.session, f["quote"]["id"])
                reply_to = m["wa_id"] if m and m["chat"] == g["chat"] else None
                if reply_to and self.vote(channel, rec, m, text, conv=g["group"]):
                    return None
            return self.send_to_whatsapp(channel, rec, g["chat"], f.get("text") or "", f.get("attachments") or [],
                                         reply_to, conv=g["group"])
        if text.startswith("/") and not f.get("quote"):
            return self.command(channel, rec, text)
        if f.get("quote"):
            m = self.store.by_sig(channel.session, f["quote"]["id"])
            if m and m["wa_id"] and self.vote(channel, rec, m, text):
                return None
        target = self.route(channel, rec)
        if target is None:
            return None
        chat, reply_to = target
        return self.send_to_whatsapp(channel, rec, chat, f.get("text") or "", f.get("attachments") or [], reply_to)

    def vote(self, channel, rec, m, text, conv=None):
        """A number quoting a forwarded poll is a vote (POST /api/sendPollVote); True when handled."""
        if not re.fullmatch(r"\s*\d{1,2}\s*", text) or m["direction"] != "w2s":
            return False
        poll = self.poll_of(channel, bare_msg_id(m["wa_id"]))
        if poll is None:
            return False
        n, to, quote = int(text), self.to(channel, conv), (rec["ts"], channel.destination, None)
        if not 1 <= n <= len(poll["options"]):
            self.signal.send(to, "That poll has options 1 to %d." % len(poll["options"]), quote=quote)
            return True
        try:
            self.waha.vote(channel.session, m["chat"], m["wa_id"], [poll["options"][n - 1]])
        except PermanentError as e:     # WAHA Core before 2026.6.1, or an engine without it: 422 / 501
            self.signal.send(to, "WAHA cannot vote in polls here (%s); vote on your phone." % shorten(str(e), 120),
                             quote=quote)
            return True
        self.signal.send(to, "You voted: %s" % poll["options"][n - 1], quote=quote)
        self.metrics.inc("whatsignal_messages_processed_total", direction="s2w", kind="vote", result="ok")
        return True

    def route(self, channel, rec):
        """Return (chat, reply_to) for an owner's message, or None after telling the owner why not."""
        quote = rec["fields"].get("quote")
        if quote:
            m = self.store.by_sig(channel.session, quote["id"])
            if m:
                return m["chat"], m["wa_id"]
            self.notify(channel, "I don't know which WhatsApp chat the quoted message belongs to (it may be older "
                        "than the retention period). Use /to <chat> <text>.", quote=(rec["ts"], channel.destination, None))
            return None
        if self.layout == "groups":
            self.notify(channel, "This conversation is the control room: write in a chat's Signal group to answer it, "
                        "quote a message, or use /to <chat> <text>.", quote=(rec["ts"], channel.destination, None))
            return None
        # the chat that was last when the owner wrote, not when this is delivered (a retry must not re-aim it)
        m = self.store.last_forwarded(channel.session, before=rec["received_at"])
        if m is None:
            self.notify(channel, "No WhatsApp chat to answer yet. Use /to <+number> <text> to start one.",
                        quote=(rec["ts"], channel.destination, None))
            return None
        return m["chat"], None

    def send_to_whatsapp(self, channel, rec, chat, text, attachments, reply_to, conv=None):
        """Send the owner's message (text and every attachment) to *chat*; return the mapping recorder.

        A message goes out as several WhatsApp sends; the ones already made are
        remembered, so a retry after a failure half-way does not repeat them.
        """
        s = channel.session
        key = "s2w-progress:%d" % rec["ts"]
        done, _, wa_id = (self.store.state(s, key, sealed=True) or "0|").partition("|")   # sealed: ids name the chat
        done, wa_id = int(done), wa_id or None
        parts = [("file", i, att) for i, att in enumerate(attachments)]
        if not attachments or (text and media_kind(attachments[0].get("contentType")) == "voice"):
            parts.append(("text", 0, None))     # a voice note carries no caption: its text goes on its own
        for n, (what, i, att) in enumerate(parts):
            if n < done:
                continue
            if what == "file":
                mid = self._send_media(channel, chat, att, text if i == 0 and text else None, reply_to)
            else:
                body, mentions = self.whatsapp_mentions(channel, chat, text)
                mid = self.waha.send_text(s, chat, body, reply_to, mentions=mentions)
            self._sent(mid)
            wa_id = wa_id or mid
            if len(parts) > 1:
                self.store.set_state(s, key, "%d|%s" % (n + 1, wa_id or ""), self.clock(), sealed=True)
        self.metrics.inc("whatsignal_messages_processed_total", direction="s2w",
                         kind="media" if attachments else "text", result="ok")
        record = self._map(channel, "s2w", chat, wa_id, rec["ts"], channel.destination, conv=conv)

        def record_and_forget_progress(db):
            record(db)
            db.execute("DELETE FROM state WHERE channel=? AND key=?", (s, key))
        return record_and_forget_progress

    def _send_media(self, channel, chat, att, caption, reply_to):
        """Send one attachment; where WAHA cannot send that kind (WAHA Core, an engine without it), send
        the caption or a placeholder as text instead, tell the owner once, and remember it for a day."""
        s = channel.session
        mime = att.get("contentType") or "application/octet-stream"
        kind = media_kind(mime)
        if kind not in self.media_refused(s):
            data = self.signal.get_attachment(att, self.max_media)
            try:
                return self.waha.send_file(s, chat, kind, mime, safe_filename(att.get("filename"), mime), data,
                                           caption=caption, reply_to=reply_to)
            except WahaMediaRefused as e:
                self._remember_refusal(channel, kind, e)
        return self.waha.send_text(s, chat, caption or MEDIA_PLACEHOLDER[kind], reply_to)

    def media_refused(self, session):
        """The media kinds WAHA refused to send in the last day (read from the database)."""
        now, out = self.clock(), set()
        for item in (self.store.state(session, "media_refused") or "").split(","):
            kind, _, at = item.partition(":")
            with contextlib.suppress(ValueError):
                if kind and 0 <= now - float(at) < MEDIA_REFUSED_TTL:
                    out.add(kind)
        return out

    def _remember_refusal(self, channel, kind, e):
        s, now = channel.session, self.clock()
        kinds = tuple(MEDIA_PLACEHOLDER) if e.plus else (kind,)      # Core refuses every media send
        known = {k for k in self.media_refused(s) if k not in kinds}
        self.store.set_state(s, "media_refused", ",".join("%s:%f" % (k, now) for k in sorted(known | set(kinds))), now)
        self.log.warn("WAHA cannot send media; captions go as text", kind=kind, reason=scrub(e, 160))
        if not self.store.state(s, "media_refused_told"):
            what = MEDIA_PLACEHOLDER[kind].strip("[]")
            why = ("sending media needs WAHA Plus (or WAHA 2026.6.1 or newer, whose Core includes it)" if e.plus
                   else "WAHA's engine cannot send %ss" % what)
            self.notify(channel, "WhatsApp got your %s as text only: %s. Media go as their caption (or %s) until "
                        "WhatSignal tries again in a day; /status shows it." % (what, why, MEDIA_PLACEHOLDER[kind]))
            self.store.set_state(s, "media_refused_told", "1", now)

    def _sig_reaction(self, channel, rec, row):
        f = rec["fields"]
        m = self.store.by_sig(channel.session, f["target_ts"])
        if m is None or not m["wa_id"]:
            self.log.info("reaction on a message the bridge does not know; dropped")
            return None
        self.waha.react(channel.session, m["wa_id"], "" if f.get("remove") else f["emoji"])
        self.metrics.inc("whatsignal_messages_processed_total", direction="s2w", kind="reaction", result="ok")
        return None

    def _own_message(self, channel, ts):
        m = self.store.by_sig(channel.session, ts)
        return m if m and m["direction"] == "s2w" and m["wa_id"] else None

    def _sig_delete(self, channel, rec, row):
        m = self._own_message(channel, rec["fields"]["target_ts"])
        if m:
            self.waha.delete(channel.session, m["chat"], m["wa_id"])
            self.metrics.inc("whatsignal_messages_processed_total", direction="s2w", kind="delete", result="ok")
        return None

    def _sig_edit(self, channel, rec, row):
        m = self._own_message(channel, rec["fields"]["target_ts"])
        if m:
            text = rec["fields"]["text"]
            if text.startswith("/to "):               # an edited /to command: only its text is the message
                words = text[4:].split(" ")
                for cut in range(len(words) - 1, 0, -1):
                    if self.find_chat(channel, " ".join(words[:cut]))[0] == m["chat"]:
                        text = " ".join(words[cut:]).strip()
                        break
            self.waha.edit(channel.session, m["chat"], m["wa_id"], text)
            self.metrics.inc("whatsignal_messages_processed_total", direction="s2w", kind="edit", result="ok")
        return None

    def _sig_receipt(self, channel, rec, row):
        if not rec["fields"].get("read"):
            return None
        by_chat = collections.OrderedDict()
        for ts in rec["fields"].get("timestamps") or []:
            m = self.store.by_sig(channel.session, ts)
            if m and m["direction"] == "w2s" and m["wa_id"]:
                by_chat.setdefault(m["chat"], []).append(m["wa_id"])
        for chat, ids in by_chat.items():
            self.waha.seen(channel.session, chat, ids)
        return None

    def _sig_typing(self, channel, rec, row):
        group = rec["fields"].get("group")
        if group:
            g = self.store.chat_of_group(channel.session, group)
            chat = g["chat"] if g else None
        elif self.layout == "inbox":
            m = self.store.last_forwarded(channel.session, before=rec["received_at"])
            chat = m["chat"] if m else None
        else:
            chat = None      # typing in the control room is nobody's business
        if chat:
            with contextlib.suppress(UpstreamError):   # typing is ephemeral: never retried
                self.waha.typing(channel.session, chat, rec["fields"].get("started"))
        return None

    # -- commands ---------------------------------------------------------------
    def command(self, channel, rec, text):
        name, _, rest = text[1:].partition(" ")
        handler = getattr(self, "_cmd_" + name.lower(), None) if re.match(r"^[a-z]{1,10}$", name.lower()) else None
        quote = (rec["ts"], channel.destination, None)
        if handler is None:
            self.notify(channel, ("Unknown command /%s.\n" % shorten(name, 20)) + HELP_TEXT, quote=quote)
            return None
        return handler(channel, rec, rest.strip(), quote)

    def _cmd_help(self, channel, rec, args, quote):
        self.notify(channel, HELP_TEXT)

    def _cmd_chats(self, channel, rec, args, quote):
        chats = self.store.recent_chats(channel.session, 15)
        if not chats:
            self.notify(channel, "No WhatsApp chats yet.")
            return
        lines = ["%d. %s%s" % (c["short"], c["name"] or "?",
                               (" (" + jid_to_phone(c["chat"]) + ")")
                               if jid_to_phone(c["chat"]) and jid_to_phone(c["chat"]) not in (c["name"] or "") else
                               (" (group)" if c["chat"].endswith("@g.us") else "")) for c in chats]
        self.notify(channel, "Recent chats (answer with /to <n> <text>):\n" + "\n".join(lines))

    def find_chat(self, channel, target):
        """Resolve a /to target: a short number, +E.164, or a name. Return (chat, error)."""
        if re.match(r"^\d{1,5}$", target):
            for c in self.store.all_chats(channel.session):
                if c["short"] == int(target):
                    return c["chat"], None
            return None, "There is no chat %s; see /chats." % target
        if target.startswith("+"):
            jid = phone_to_jid(target)
            return (jid, None) if jid else (None, "%s is not a phone number in +E.164 form." % shorten(target, 20))
        # A name reaches saved contacts and groups; people outside the owner's contacts (shown as
        # "~push name (+number)", a name they chose themselves) only by that whole marked name.
        low = " ".join(target.split()).lower()
        named = [c for c in self.store.all_chats(channel.session) if c["name"]]
        saved = lambda c: (c["chat"].endswith("@g.us")
                           or self.store.contact(channel.session, c["chat"])[0] == "=" + c["name"])
        for c in named:     # a name recorded by an older release, or no longer saved: not trusted as a contact's
            if not c["name"].startswith("~") and not saved(c):
                c["name"] = "~" + c["name"]
        strangers = [c for c in named if c["name"].startswith("~")]
        whole = [c for c in strangers if c["name"].lower() == low]
        if len(whole) == 1:
            return whole[0]["chat"], None
        matches = [c for c in named if not c["name"].startswith("~") and low in c["name"].lower()]
        exact = [c for c in matches if c["name"].lower() == low]
        if len(matches) == 1 or len(exact) == 1 and not exact[0]["chat"].endswith("@g.us"):
            return (exact if len(matches) > 1 else matches)[0]["chat"], None
        listing = lambda cs: ", ".join("%d. %s" % (c["short"], c["name"]) for c in cs[:5])
        if matches:
            return None, "%r matches several chats: %s. Use the number from /chats." % (shorten(target, 30),
                                                                                      listing(matches))
        others = [c for c in strangers if low in c["name"].lower()]
        if others:
            return None, ("No saved contact or group is named %r. Not in your contacts: %s. Write to them with "
                          "/to <n> or their +number." % (shorten(target, 30), listing(others)))
        return None, "No chat named %r; see /chats." % shorten(target, 30)

    def _cmd_to(self, channel, rec, args, quote):
        words = args.split(" ")
        chat, error, text = None, "Use /to <n|+number|name> <text>.", ""
        for cut in range(len(words) - 1, 0, -1):      # longest name first: "/to Alice Example hi"
            target, text = " ".join(words[:cut]), " ".join(words[cut:]).strip()
            if not text:
                continue
            chat, err = self.find_chat(channel, target)
            if chat:
                break
            error = err if cut == 1 else error
        if not chat:
            self.notify(channel, error, quote=quote)
            return
        conv = None
        g = self.store.group_of_chat(channel.session, chat) if self.layout == "groups" else None
        if g and g["state"] == "left":       # held items would block the owner's later messages, /reopen too
            self.notify(channel, "You left that chat's Signal group; /reopen %s first." % (g["name"] or "<chat>"),
                        quote=quote)
            return None
        if self.layout == "groups":
            title = self.display_name(channel, chat, group=chat.endswith("@g.us"))
            conv = self.ensure_group(channel, chat, title + (" (WhatsApp)" if chat.endswith("@g.us") else ""))
        after = self.send_to_whatsapp(channel, rec, chat, text, rec["fields"].get("attachments") or [], None, conv=conv)
        if conv:
            g = self.store.group_of_chat(channel.session, chat)
            with contextlib.suppress(UpstreamError):   # the message went out: a lost notice must not resend it
                self.notify(channel, "Sent. The chat continues in the Signal group %r." % (g["name"] if g else "?"))
        return after

    def _cmd_reopen(self, channel, rec, args, quote):
        if not args:
            self.notify(channel, "Use /reopen <n|+number|name>.", quote=quote)
            return
        chat, error = self.find_chat(channel, re.sub(r"\s*\(WhatsApp\)$", "", args))
        g = self.store.group_of_chat(channel.session, chat) if chat else None
        if not chat or not g or g["state"] != "left":
            self.notify(channel, error or "That chat's Signal group is not closed.", quote=quote)
            return
        self.store.save_group(channel.session, chat, self.clock(), "creating", secrets.token_hex(6), name=g["name"])
        self.ensure_group(channel, chat, g["name"])
        n = self.store.release_held(channel.session, chat, self.clock())
        self.wake["w2s"].set()
        self.notify(channel, "Reopened %r in a new Signal group; %d held message(s) follow." % (g["name"], n))

    def _chat_title(self, channel, chat):
        return self.store.chat_name(channel.session, chat)[0] or jid_to_phone(chat) or chat.split("@")[0]

    def _chat_arg(self, channel, args, usage, quote):
        """The chat a command names, or None after telling the owner why (its *usage*, or find_chat's answer)."""
        chat, error = self.find_chat(channel, args) if args else (None, usage)
        if not chat:
            self.notify(channel, error, quote=quote)
        return chat

    def _cmd_mute(self, channel, rec, args, quote):
        words = args.split()
        seconds = None
        if len(words) > 1 and re.fullmatch(r"\d{1,5}[mhdw]", words[-1].lower()):
            seconds = int(words[-1][:-1]) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[words[-1][-1].lower()]
            words = words[:-1]
        chat = self._chat_arg(channel, " ".join(words), "Use /mute <chat> [30m|8h|2d|1w].", quote)
        if not chat:
            return None
        until = self.clock() + seconds if seconds else None
        self._set_mute(channel, chat, until)
        when = "until " + utc_minute(until) if until else "until you unmute it"
        self.notify(channel, "Muted %s %s. Its messages are kept, not forwarded; /unmute %s brings it back."
                    % (self._chat_title(channel, chat), when, self._chat_title(channel, chat)), quote=quote)
        return None

    def _cmd_unmute(self, channel, rec, args, quote):
        chat = self._chat_arg(channel, args, "Use /unmute <chat>.", quote)
        if not chat:
            return None
        self._set_mute(channel, chat, None, remove=True)
        n, title = self.held_while_muted(channel, chat), self._chat_title(channel, chat)
        self.notify(channel, "Unmuted %s." % title + (" %d message(s) came while it was muted; /deliver %s sends "
                                                       "them." % (n, title) if n else ""), quote=quote)
        return None

    def _cmd_deliver(self, channel, rec, args, quote):
        chat = self._chat_arg(channel, args, "Use /deliver <chat>.", quote)
        if not chat:
            return None
        if self.muted(channel, chat):
            self.notify(channel, "%s is muted; /unmute it first." % self._chat_title(channel, chat), quote=quote)
            return None
        toks = [self.store.tok("chat", c) for c in self._forms(channel, chat)]
        with self.store.tx() as db:
            n = db.execute("UPDATE queue SET state='pending', next_at=?, updated_at=? WHERE channel=? AND state='muted'"
                           " AND " + ENDED + " AND chat IN (%s)" % ",".join("?" * len(toks)),
                           [self.clock(), self.clock(), channel.session] + toks).rowcount
        self.wake["w2s"].set()
        self.notify(channel, "%d message(s) from %s follow." % (n, self._chat_title(channel, chat)), quote=quote)
        return None

    def _cmd_muted(self, channel, rec, args, quote):
        now = self.clock()
        lines = []
        for chat, until in sorted(self.mutes(channel).items()):
            if until is not None and until <= now:
                continue
            lines.append("%s: %s, %d kept" % (
                self._chat_title(channel, chat), "until " + utc_minute(until) if until else "until unmuted",
                self.held_while_muted(channel, chat)))
        ignore = len(self.ignore_ids) + len(self.ignore_names)
        if ignore:
            lines.append("and %d chat(s) in bridge.ignoreChats, never forwarded" % ignore)
        self.notify(channel, "Muted chats:\n" + "\n".join(lines) if lines else "No muted chats.", quote=quote)
        return None

    def _cmd_status(self, channel, rec, args, quote):
        s = channel.session
        lines = ["WhatSignal %s" % __version__,
                 "WhatsApp session %s: %s" % (s, self.store.state(s, "session_status") or "unknown"),
                 "Waiting for Signal: %d, for WhatsApp: %d" % (self.store.queue_depth("w2s"), self.store.queue_depth("s2w"))]
        refused = self.media_refused(s)
        if refused:
            lines.append("Media to WhatsApp: sent as text, WAHA cannot send %s (needs WAHA Plus or another engine)"
                         % ", ".join(sorted(refused)))
        dead = self.store.one("SELECT COUNT(*) FROM queue WHERE state='dead' AND " + ENDED)[0]
        if dead:
            lines.append("Undeliverable (see `whatsignal.py outbox`): %d" % dead)
        if self.signal.problem:
            lines.append("Signal: " + self.signal.problem)
        try:
            self.waha.ping()
        except (UpstreamError, OSError) as e:   # the owner sees where it fails; /health shows anyone only the kind
            lines.append("WAHA: " + scrub(e, 160))
        loose = private_files_warning(self.store.path, self.cache_dir)
        if loose:
            lines.append("Warning: " + loose)
        lines.append("Last catch-up: " + describe_catchup(self.store.state(s, "catchup_last")))
        muted = [c for c, u in self.mutes(channel).items() if u is None or u > self.clock()]
        if muted:
            lines.append("Muted chats: %d (see /muted)" % len(muted))
        self.notify(channel, "\n".join(lines))


def describe_catchup(raw):
    """One line about the last catch-up pass (its JSON summary as stored), for /status."""
    try:
        c = json.loads(raw) if raw else None
    except ValueError:
        c = None
    if not isinstance(c, dict):
        return "none yet"
    when = utc_minute(c.get("at", 0))
    if c.get("error"):
        return "%s, failed: %s (tried again in a minute)" % (when, c["error"])
    if c.get("first"):
        return "%s, first start: no history imported" % when
    return "%s, %d chat(s) with activity, %d message(s) recovered" % (when, c.get("chats", 0), c.get("recovered", 0))

###############################################################################
# Workers #####################################################################
###############################################################################

_DIGITS = re.compile(r"\+?\d{6,}")


def scrub(text, limit=200):
    """Return *text* cut short with long digit runs (phone numbers) masked, for logs and stored errors."""
    return _DIGITS.sub(lambda m: mask_phone(m.group(0)), shorten(str(text), limit))


class Worker:
    """A daemon thread with start/stop; ``stop`` sets an Event and joins, as QueueListener does."""

    name = "worker"

    def __init__(self):
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run_safely, name=self.name, daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout=5.0):
        self.stopping.set()
        self.interrupt()
        if self.thread is not None:
            self.thread.join(timeout)

    def interrupt(self):
        """Wake the thread from whatever it blocks on (overridden by workers that block on sockets)."""

    def _run_safely(self):
        while not self.stopping.is_set():
            try:
                self.run()
                return
            except Exception as e:  # pragma: no cover - a worker never dies from one bug
                self.log.error("worker crashed; restarting it", worker=self.name, error=e.__class__.__name__)
                self.stopping.wait(1.0)


class Deliverer(Worker):
    """Drains one direction of the queue: in order per chat, with retries and dead letters."""

    batch = 256      # items read per pass
    idle_wait = 1.0  # longest sleep when nothing is due (s)

    def __init__(self, bridge, direction, leader, clock=None, rand=None):
        super().__init__()
        self.bridge, self.store, self.log, self.metrics = bridge, bridge.store, bridge.log, bridge.metrics
        self.direction = direction
        self.name = "deliver-" + direction
        self.leader = leader
        # a LeaderFlag proves the lease before each send and fences each record; a plain Event has no lease
        self.proves, self.fence = getattr(leader, "proves", leader.is_set), getattr(leader, "fence", None)
        self.clock = clock or bridge.clock
        self.rand = rand or bridge.rand
        self.wake = bridge.wake[direction]
        self.expire = bridge.config.get("bridge.expireAfterHours") * 3600
        self.waiting, self.seen, self.full_at = set(), 0, 0.0   # see run_once
        self.retry_at = 0.0        # when the item that last failed is due again
        self.passes = 0            # run_once calls done by run() (tests wait on it instead of sleeping)

    def interrupt(self):
        self.wake.set()

    def run(self):
        while not self.stopping.is_set():
            if not self.leader.is_set():
                self.stopping.wait(0.5)
                continue
            try:
                done, delay = self.run_once()
            except StoreError as e:
                self.log.error("database unavailable to the delivery worker", direction=self.direction, reason=scrub(e))
                done, delay = 0, 2.0
            self.passes += 1
            if not done:
                self.wake.wait(delay)
                self.wake.clear()

    def run_once(self):
        """Deliver what is due now; return (items handled, seconds until something may be due).

        A full pass starts from the oldest pending item.  Until the next one (when
        the first waiting chat comes due, at most a second later) a wake-up reads
        only items queued since, so a backlog of chats waiting for a retry is not
        read again for every new webhook; chats seen waiting stay skipped, which
        keeps the order per chat.
        """
        now = self.clock()
        full = not 0 <= self.full_at - now <= self.idle_wait      # also after the clock jumped
        if full:
            self.waiting, self.seen = set(), 0
        done, delay = 0, self.idle_wait
        while not self.stopping.is_set():
            rows = self.store.pending(self.direction, self.batch, after=self.seen)
            n, d = self._pass(rows)
            done, delay = done + n, min(delay, d)
            if n or len(rows) < self.batch or not self.leader.is_set():
                break                           # a full batch with nothing due: read on past it
        self.full_at = now + delay if full else min(self.full_at, now + delay)
        if full:
            self.metrics.set("whatsignal_queue_depth", self.store.queue_depth(self.direction), direction=self.direction)
        return done, max(0.0, min(delay, self.full_at - now))

    def _pass(self, rows):
        done, delay = 0, self.idle_wait
        for row in rows:
            if self.stopping.is_set() or not self.leader.is_set():
                break
            self.seen = max(self.seen, row["id"])
            if row["chat"] in self.waiting:
                continue
            now = self.clock()
            wait = row["next_at"] - now
            if wait > 0 and now >= row["updated_at"] - 60:   # scheduled before now, unless the clock went back
                self.waiting.add(row["chat"])
                delay = min(delay, wait)
                continue
            self.bridge.intake.give_way(self.stopping)
            if not self.proves():               # no send without proof that the lease is still ours
                self.seen = row["id"] - 1       # (read again once it is)
                break
            if not self.deliver(row):
                self.waiting.add(row["chat"])
                delay = min(delay, max(0.0, self.retry_at - now))
            done += 1
        return done, delay

    def deliver(self, row):
        """Try one item; return True when it left the queue (delivered or dead)."""
        try:
            return self._deliver(row)
        except LeaseLost:
            self.log.error("the delivery lease passed to another instance during a delivery; this item is left to it",
                           direction=self.direction, item=row["id"])
            return False

    def _deliver(self, row):
        try:
            after = self.bridge.process(self.direction, row)
            self._record_done(row, after)
            if self.direction == "w2s" and row["channel"] in self.bridge.untrusted:
                self.bridge.untrusted.discard(row["channel"])      # the owner's new key was trusted by hand
                self.bridge.tell_key_trusted(self.bridge.config.channel(row["channel"]))
            self.metrics.observe("whatsignal_delivery_latency_seconds", max(0.0, self.clock() - row["created_at"]),
                                 direction=self.direction)
            took = (self.clock() - row["created_at"]) * 1000
            (self.log.info if took > 5000 else self.log.debug)(
                "delivered, processing time %.0f ms" % took, direction=self.direction, kind=row["kind"], item=row["id"])
            return True
        except TransientError as e:
            channel = self.bridge.config.channel(row["channel"])
            if channel is not None and isinstance(e, IdentityError):
                self.bridge.owner_key_changed(channel, "send")
            elif channel is not None and isinstance(e, CaptchaRequired):
                self.bridge.captcha_required(channel, e)
            return self._retry(row, e)
        except Muted:
            self.store.finish(row["id"], "muted", self.clock())
            self.metrics.inc("whatsignal_messages_processed_total", direction=self.direction, kind=row["kind"],
                             result="muted")
            return True
        except (PermanentError, CryptoError) as e:
            if isinstance(e, CryptoError):
                self.metrics.inc("whatsignal_encryption_errors_total")
            return self._dead(row, str(e))
        except (StoreError, LeaseLost):
            raise
        except Exception as e:
            self.log.error("internal error while delivering; item parked", direction=self.direction, item=row["id"],
                           error=e.__class__.__name__, where=_where(e))
            return self._dead(row, "internal error (%s)" % e.__class__.__name__)

    def _record_done(self, row, after):
        """Mark a delivered item done; the send happened, so keep trying rather than send it again."""
        for attempt in range(60):
            try:
                self.store.finish(row["id"], "done", self.clock(), after=after, fence=self.fence)
                self._ended(row)
                return
            except StoreError as e:
                if attempt == 0:
                    self.log.error("delivered, but the database cannot record it yet; retrying", reason=scrub(e))
                time.sleep(0.5)
        raise StoreError("could not record a delivered item")

    def _retry(self, row, e):
        now = self.clock()
        attempts = row["attempts"] + 1
        if isinstance(e, HeldError):
            self.retry_at = now + e.retry_after
            self.store.finish(row["id"], "pending", now, error=scrub(e), attempts=attempts, next_at=self.retry_at,
                              fence=self.fence)
            return False
        if now - row["created_at"] > self.expire and not isinstance(e, IdentityError):
            return self._dead(row, "gave up after %.0f hours: %s" % (self.expire / 3600, e))
        delay = max(e.retry_after or 0.0, next_backoff(attempts - 1, rand=self.rand))
        self.retry_at = now + delay
        self.store.finish(row["id"], "pending", now, error=scrub(e), attempts=attempts, next_at=self.retry_at,
                          fence=self.fence)
        self.metrics.inc("whatsignal_messages_processed_total", direction=self.direction, kind=row["kind"], result="retry")
        self.log.warn("delivery failed, will retry", direction=self.direction, item=row["id"], attempt=attempts,
                      retry_in_s=round(delay, 1), reason=scrub(e))
        return False

    def _ended(self, row):
        """An item left the queue (sent, dead or expired): its decrypted media goes with it."""
        if self.direction == "w2s":
            self.bridge.drop_media(row)

    def _dead(self, row, reason):
        self.store.finish(row["id"], "dead", self.clock(), error=scrub(reason), fence=self.fence)
        self._ended(row)
        self.metrics.inc("whatsignal_dead_letters_total", direction=self.direction)
        self.metrics.inc("whatsignal_messages_processed_total", direction=self.direction, kind=row["kind"], result="dead")
        self.log.error("delivery failed permanently; see `whatsignal.py outbox`", direction=self.direction,
                       item=row["id"], reason=scrub(reason))
        self._tell_owner(row, reason)
        return True

    def _tell_owner(self, row, reason):
        channel = self.bridge.config.channel(row["channel"])
        if channel is None:
            return
        try:
            rec = self.store.record_of(row)
            if self.direction == "s2w":
                self.bridge.notify(channel, "Not delivered to WhatsApp: %s" % shorten(reason, 160),
                                   quote=(rec["ts"], channel.destination, None))
                return
            chat = rec.get("chat") or rec.get("_chat") or ""
            saved = self.store.contact(channel.session, chat)[0] or ""      # "=name" when saved (display_name)
            name = saved[1:] if saved[:1] == "=" else self.store.chat_name(channel.session, chat)[0]
            what = {"message": "A WhatsApp message"}.get(row["kind"], "A WhatsApp " + row["kind"].replace(".", " "))
            self.bridge.notify(channel, "%s from %s could not be delivered here: %s. `whatsignal.py outbox` lists it."
                               % (what, name or jid_to_phone(chat) or "a chat", shorten(reason, 160)))
        except (UpstreamError, CryptoError, StoreError, ValueError) as e:
            self.log.error("could not tell the owner about an undelivered message", direction=self.direction,
                           reason=scrub(e))


def _where(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "%s:%d" % (tb.tb_frame.f_code.co_name, tb.tb_lineno) if tb else "?"


class MediaPrefetcher(Worker):
    """Downloads queued WhatsApp media as soon as it arrives, independently of Signal.

    WAHA deletes its media files after a few minutes (WHATSAPP_FILES_LIFETIME,
    180 s by default): a photo waiting behind a Signal outage must already be
    on disk.  The delivery worker uses the same file, or downloads it itself.
    """

    name = "media-prefetch"

    def __init__(self, bridge, leader):
        super().__init__()
        self.bridge, self.store, self.log = bridge, bridge.store, bridge.log
        self.leader = leader
        self.last_id = 0

    def interrupt(self):
        self.bridge.wake_media.set()

    def run(self):
        while not self.stopping.is_set():
            self.bridge.wake_media.wait(5.0)
            self.bridge.wake_media.clear()
            if self.leader.is_set():
                with contextlib.suppress(StoreError):
                    self.run_once()

    def run_once(self):
        rows = self.store.query("SELECT * FROM queue WHERE direction='w2s' AND state='pending'"
                                " AND kind IN ('message', 'message.own')"
                                " AND id > ? ORDER BY id LIMIT 200", (self.last_id,))
        for row in rows:
            if self.stopping.is_set():
                return
            self.last_id = row["id"]
            try:
                media = self.bridge.store.record_of(row).get("media")
                if media and media.get("url") and not media.get("error"):
                    self.bridge.fetch_media(media, row, prefetch=True)
            except (UpstreamError, CryptoError, OSError, ValueError) as e:
                self.log.debug("media prefetch failed; delivery will try again", reason=scrub(e, 80))


class SessionWatcher(Worker):
    """Polls every WAHA session's status at start and every minute (Bridge.poll_session)."""

    name = "session-watch"

    def __init__(self, bridge, leader, interval=SESSION_POLL_SECONDS):
        super().__init__()
        self.bridge, self.log, self.leader, self.interval = bridge, bridge.log, leader, interval
        self.ticks = 0          # reads done (so a test knows the one at start is over)

    def run(self):
        due = 0.0
        while not self.stopping.is_set():
            if self.leader.is_set() and time.monotonic() >= due:
                self.tick()
                due = time.monotonic() + self.interval
            self.stopping.wait(min(5.0, max(0.05, due - time.monotonic())))

    def tick(self):
        for channel in self.bridge.config.channels:
            with contextlib.suppress(StoreError):
                self.bridge.poll_session(channel)
        self.ticks += 1


class CatchUp(Worker):
    """Runs catch-up passes: once per channel when this instance becomes active, and whenever a
    WAHA session returns to WORKING.  A pass that fails (WAHA down) is tried again later."""

    name = "catch-up"

    def __init__(self, bridge, leader, pace=CATCHUP_PACE, retry=CATCHUP_RETRY):
        super().__init__()
        self.bridge, self.store, self.log = bridge, bridge.store, bridge.log
        self.leader, self.pace, self.retry = leader, pace, retry
        self.started = False
        self.due = {}    # session -> time a failed pass is tried again

    def interrupt(self):
        self.bridge.wake_catchup.set()

    def run(self):
        while not self.stopping.is_set():
            if not self.leader.is_set():
                self.started = False
                self.stopping.wait(0.5)
                continue
            if not self.started:           # every start (and take-over) reconciles once
                self.started = True
                for ch in self.bridge.config.channels:
                    self.bridge.want_catchup(ch.session)
            now = time.monotonic()
            for s, at in list(self.due.items()):
                if at <= now:
                    del self.due[s]
                    self.bridge.want_catchup(s)
            self.bridge.wake_catchup.clear()
            for s in sorted(self.bridge.take_catchups()):
                if not self.stopping.is_set():
                    self.pass_once(s)
            waits = [at - time.monotonic() for at in self.due.values()]
            self.bridge.wake_catchup.wait(max(0.05, min(waits + [5.0])))

    def pass_once(self, session):
        """One catch-up pass over *session*, recorded for /status and stats; False if it failed."""
        channel = self.bridge.config.channel(session)
        if channel is None:
            return False
        try:
            summary = self.bridge.catch_up(channel, pause=lambda: self.stopping.wait(self.pace))
        except (UpstreamError, StoreError, CryptoError) as e:
            self.due[session] = time.monotonic() + self.retry
            self.log.warn("catch-up with WAHA failed; trying again later", session=session, reason=scrub(e, 120),
                          retry_in_s=self.retry)
            summary = {"at": self.bridge.clock(), "error": scrub(e, 120)}
        with contextlib.suppress(StoreError):
            self.store.set_state(session, "catchup_last", json.dumps(summary), self.bridge.clock())
        return "error" not in summary


class SignalReceiver(Worker):
    """Keeps receiving from signal-cli: SSE (daemon), WebSocket (REST json-rpc) or polling (REST normal)."""

    name = "signal-receiver"

    def __init__(self, bridge, leader, sleep_cap=60.0):
        super().__init__()
        self.bridge, self.signal, self.log = bridge, bridge.signal, bridge.log
        self.leader = leader
        self.sleep_cap = sleep_cap
        self.conn = None
        self.connected = threading.Event()

    def interrupt(self):
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)

    def _opened(self, conn):
        self.conn = conn
        self.connected.set()
        self.attempt = 0
        self.log.info("receiving from Signal", backend=self.signal.kind)

    def run(self):
        self.attempt = 0
        while not self.stopping.is_set():
            if not self.leader.is_set():
                self.stopping.wait(0.5)
                continue
            try:
                self.receive_once()
            except UpstreamError as e:
                if self.stopping.is_set():
                    break
                # signal-cli-rest-api in json-rpc mode drops what arrives while no socket is open
                cap = 2.0 if getattr(self.signal, "mode", None) == "json-rpc" else self.sleep_cap
                delay = next_backoff(self.attempt, 1.0, 2.0, cap, self.bridge.rand)
                self.attempt += 1
                self.log.warn("signal receive interrupted; reconnecting", reason=scrub(e), retry_in_s=round(delay, 1))
                self.stopping.wait(delay)
            finally:
                self.connected.clear()
                self.conn = None

    def receive_once(self):
        """One connection's worth of receiving (or one poll)."""
        sig = self.signal
        if isinstance(sig, SignalRestClient) and sig.mode is None:
            sig.about()
        if isinstance(sig, SignalRestClient) and sig.mode in ("normal", "native", None):
            items = sig.poll()
            self.connected.set()
            self.attempt = 0
            for obj in items:
                self.take(obj)
            self.stopping.wait(self.bridge.config.get("signal.pollIntervalSeconds"))
            return
        for obj in sig.events(self.stopping, on_open=self._opened):
            self.take(obj)

    def take(self, obj):
        """Commit one receive object; signal-cli already consumed it, so keep trying (also while stopping)."""
        for attempt in range(120):
            try:
                self.bridge.ingest_envelope(obj)
                return
            except StoreError as e:
                if attempt == 0:
                    self.log.error("database unavailable; holding the Signal stream", reason=scrub(e))
                time.sleep(0.5)
        self.log.error("a Signal message could not be stored and is lost; check the database")


_OWN_HOLDERS = set()   # lease holder names of the LeaseKeepers alive in this process


def _host_id():
    """This host and PID namespace, as one token without colons (a PID means something only within both)."""
    ns = ""
    with contextlib.suppress(OSError):
        ns = "-%d" % os.stat("/proc/self/ns/pid").st_ino
    return (socket.gethostname().replace(":", "_") + ns)[:80]


def lease_holder_dead(holder):
    """True when *holder* ("host:pid:token") names a process of this host that no longer runs."""
    host, _, rest = str(holder).partition(":")
    pid = rest.split(":", 1)[0]
    if host != _host_id() or not pid.isdigit():
        return False          # another host, container or PID namespace: only its lease expiry tells
    if int(pid) == os.getpid():          # our own pid: an earlier incarnation (container restart), unless alive here
        return holder not in _OWN_HOLDERS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class LeaderFlag(threading.Event):
    """Set while this instance holds the delivery lease, and only until its own monotonic deadline.

    ``is_set`` turns false by itself when the lease was not renewed in time (a paused process, a
    database that stopped answering), whatever the wall clock says.  ``proves`` also checks the
    lease row, and ``fence`` does so inside a transaction: no send starts, and no delivery is
    recorded, without proof that the lease is still ours.
    """

    def __init__(self, keeper):
        super().__init__()
        self.keeper = keeper

    def is_set(self):
        return super().is_set() and self.keeper.monotonic() < self.keeper.valid_until

    def fence(self, db):
        self.keeper.store.lease_fence(db, self.keeper.holder, self.keeper.generation)

    def proves(self):
        """True when the lease row names this instance in the generation it took (one read)."""
        if not self.is_set():
            return False
        with self.keeper.store.lock:
            try:
                self.fence(self.keeper.store.db)
            except (LeaseLost, sqlite3.Error):
                return False
        return True


class LeaseKeeper(Worker):
    """Holds the delivery lease so only one instance on a volume runs workers and the receiver.

    Fenced: another instance's lease is taken only after this keeper watched it unchanged (not
    renewed) for a whole lease period on its own monotonic clock, so a step of either wall clock
    cannot hand it over early; the holder counts its own expiry on its monotonic clock too, and
    every send and every recorded delivery is checked against the lease's generation.
    """

    name = "lease"

    def __init__(self, store, log, metrics, clock=time.time, holder=None, seconds=LEASE_SECONDS,
                 monotonic=time.monotonic):
        super().__init__()
        self.store, self.log, self.metrics, self.clock = store, log, metrics, clock
        self.monotonic = monotonic
        self.holder = holder or "%s:%d:%s" % (_host_id(), os.getpid(), secrets.token_hex(4))
        self.lock = threading.Lock()   # tick and release never interleave
        _OWN_HOLDERS.add(self.holder)
        self.seconds = seconds
        self.generation = None     # of the lease while this instance holds it
        self.valid_until = 0.0     # monotonic: this instance may start a send until then
        self.watched = None        # (another holder's lease row, monotonic time it was first seen so)
        self.leader = LeaderFlag(self)
        self.rounds = 0            # ticks done (tests wait on it instead of sleeping)

    def tick(self):
        with self.lock:
            if not self.stopping.is_set():
                self._tick()
                self.rounds += 1

    def _lapsed(self, row):
        """True once another holder's lease row has stayed the same for a lease period (monotonic): this
        instance's period or the holder's, whichever is longer."""
        now = self.monotonic()
        if self.watched is None or self.watched[0] != row:
            self.watched = (row, now)
            return False
        return now - self.watched[1] >= max(self.seconds, row[4] or 0)

    def _tick(self):
        started, now = self.monotonic(), self.clock()
        try:   # a heartbeat of every serving instance: restore and rotate-key refuse while any is fresh
            self.store.acquire_lease(self.holder, now, self.seconds, name="serving:" + self.holder)
        except StoreError:
            pass
        try:
            generation = self.store.acquire_lease(self.holder, now, self.seconds, is_dead=lease_holder_dead,
                                                  lapsed=self._lapsed)
            if generation:
                # two renewals may fail before this instance stops by itself, a third of a period
                # before another one may take over
                self.generation, self.valid_until = generation, started + self.seconds * 2 / 3
                self.watched = None
            got = bool(generation)
        except StoreError:
            got = self.leader.is_set()
        if got and not super(LeaderFlag, self.leader).is_set():
            self.log.info("this instance now delivers messages (lease taken)")
            self.leader.set()
        elif not got and super(LeaderFlag, self.leader).is_set():
            self.log.warn("lease lost to another instance; delivery paused here")
            self.leader.clear()
        self.metrics.set("whatsignal_leader", 1 if got else 0)

    def run(self):
        while not self.stopping.is_set():
            self.tick()
            self.stopping.wait(self.seconds / 3)
        self.release()

    def release(self):
        """Give up the heartbeat and, if held, the delivery lease (clean shutdown): another instance may go on at once."""
        with self.lock:
            with contextlib.suppress(StoreError, sqlite3.ProgrammingError):
                self.store.release_lease(self.holder, name="serving:" + self.holder)
                self.store.release_lease(self.holder)
            self.leader.clear()

###############################################################################
# HTTP server #################################################################
###############################################################################


def _public_error(exc):
    """What /health tells anyone about a failed check: the kind of failure, never a host, port or path."""
    if isinstance(exc, (StoreError, sqlite3.Error)):
        return "database error"
    if any(isinstance(e, socket.timeout) for e in (exc, exc.__cause__, exc.__context__)):
        return "timed out"
    if isinstance(exc, SignalSetupError):
        return "misconfigured"
    return "refused" if isinstance(exc, PermanentError) else "unavailable"


class AuthThrottle:
    """Counts failed webhook signatures per client; past the limit the client gets 429."""

    def __init__(self, limit=AUTH_FAIL_LIMIT, window=AUTH_FAIL_WINDOW, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.fails = {}
        self.lock = threading.Lock()

    def _recent(self, client):
        now = self.clock()
        q = self.fails.get(client)
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, client):
        with self.lock:
            q = self._recent(client)
            return bool(q) and len(q) >= self.limit

    def fail(self, client):
        with self.lock:
            if len(self.fails) > 10000:
                self.fails.clear()
            q = self._recent(client)
            if q is None:
                q = self.fails[client] = collections.deque(maxlen=self.limit * 2)
            q.append(self.clock())


class BodyBudget:
    """Bytes of not yet verified webhook bodies the server holds at once.

    A body is read only into a reservation of its announced length; when the
    budget cannot take it, the request is answered 503 before a byte is read.
    Bodies over SMALL_BODY never take the last *reserve* bytes, so large bodies
    from strangers cannot keep WAHA's ordinary (small) webhooks out.
    """

    def __init__(self, total, reserve=BODY_RESERVE):
        self.total, self.reserve = total, reserve
        self.used = 0
        self.lock = threading.Lock()

    def take(self, n):
        with self.lock:
            limit = self.total if n <= SMALL_BODY else self.total - self.reserve
            if self.used + n > limit:
                return False
            self.used += n
            return True

    def give(self, n):
        with self.lock:
            self.used -= n


# Where the kernel keeps a connection's time limits (SO_RCVTIMEO/SO_SNDTIMEO, struct timeval of two longs).  A
# socket with a Python timeout polls before every recv and send, and each of the two calls lets go of the
# interpreter lock: with webhooks on several threads, two hand-offs of the lock per read or write.  Elsewhere
# the server keeps Python's timeouts.
KERNEL_TIMEOUTS = sys.platform.startswith("linux")


def _timeval(seconds):
    """*seconds* as a struct timeval, at least 1 ms: a zero timeval would mean no limit at all."""
    seconds = max(0.001, seconds)
    return struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6))


def kernel_timeouts(sock, seconds):
    """Make *sock* blocking with its reads and writes limited to *seconds* by the kernel; False if it cannot."""
    if not KERNEL_TIMEOUTS:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
    except (OSError, struct.error):
        return False
    sock.settimeout(None)
    return True


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each limited by what is left of the request's deadline (not per read)."""

    def __init__(self, sock, idle, kernel=False):
        self.sock, self.idle, self.kernel = sock, idle, kernel
        self.deadline = None       # monotonic time by which the current request must have arrived
        self.timeout = idle if kernel else sock.gettimeout()   # set again only when it changes

    def readable(self):
        return True

    def _set(self, timeout):
        if timeout != self.timeout:
            if self.kernel:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            else:
                self.sock.settimeout(timeout)
            self.timeout = timeout

    def readinto(self, buf):
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(self.idle, self.deadline - time.monotonic())
            if timeout <= 0:
                raise socket.timeout("request not received within server.requestTimeoutSeconds")
        self._set(timeout)
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:     # the kernel's limit ran out (EAGAIN on a blocking socket)
            raise socket.timeout("timed out") from None

    def received(self):
        """The request has been read: the deadline ends, the idle limit is back."""
        self.deadline = None
        self._set(self.idle)


class _SocketWriter(io.BufferedIOBase):
    """A connection's writes (``socketserver``'s own writer), a send the kernel's limit ended being a timeout."""

    def __init__(self, sock):
        self.sock = sock

    def writable(self):
        return True

    def write(self, b):
        try:
            self.sock.sendall(b)
        except BlockingIOError:     # SO_SNDTIMEO ran out: the client does not take the answer
            raise socket.timeout("timed out") from None
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self):
        return self.sock.fileno()


class _HeadersNext(Exception):
    """The standard library has parsed the request line and goes on to the headers, which the server reads itself."""


class _NoHeaders:
    """Stands in for rfile while the standard library parses the request line; stops it at the headers.

    Left to go on, it would run the email parser even on an empty header block.
    """

    @staticmethod
    def readline(limit=-1):
        raise _HeadersNext()


HEADER_LINE = re.compile(rb"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")   # name: value, as the email parser reads it
MAX_HEADER_LINE, MAX_HEADERS = 65536, 100                              # http.client's limits


class _Headers(http.client.HTTPMessage):
    """An HTTPMessage whose ``get`` is a dict look-up: the first value of a name, as ``Message.get`` gives it.

    ``Message.get`` lower-cases every stored name on every call; a webhook asks for eight headers.  Values
    decoded from ISO-8859-1 hold no surrogates, so the email policy would hand them back unchanged.
    """

    _first = None     # lower-cased name -> first value; dropped by every method that changes the headers

    def get(self, name, failobj=None):
        if self._first is None:
            self._first = {}
            for k, v in self._headers:
                self._first.setdefault(k.lower(), v)
        return self._first.get(name.lower(), failobj)


def _drops_index(method):
    def changed(self, *args, **kwargs):
        self._first = None
        return method(self, *args, **kwargs)
    return changed


for _name in ("__setitem__", "__delitem__", "set_raw", "add_header", "replace_header", "set_boundary"):   # Message's
    setattr(_Headers, _name, _drops_index(getattr(http.client.HTTPMessage, _name)))     # writers of its header list
del _name


def parse_header_block(lines):
    """An HTTPMessage of *lines* (each ending in a line break), equal to what ``http.client.parse_headers`` builds.

    Plain ``Name: value`` lines are split here (about 8 times cheaper than the
    email parser, which was a fifth of a webhook's CPU); a block with anything
    else (folded lines, a bare CR, a line without a name) goes to the email
    parser unchanged.
    """
    msg = _Headers()
    for line in lines:
        m = HEADER_LINE.fullmatch(line)
        if m is None:
            return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(b"".join(lines).decode("iso-8859-1"))
        msg.set_raw(m.group(1).decode("ascii"), m.group(2).decode("iso-8859-1"))
    return msg


SIGNATURE_SHAPE = re.compile(r"[0-9a-fA-F]{128}")   # hex HMAC-SHA512, checked before any body byte is read
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
                 b"Connection: close\r\nContent-Length: 47\r\n\r\n{\"error\": \"too many connections, retry later\"}\n")


class BridgeServer(http.server.ThreadingHTTPServer):
    """The webhook, health and metrics server; handlers reach the App through ``self.app``.

    At most ``server.maxConnections`` connections (one handler thread each) are
    served at once; the accept loop answers any further one 503 itself, without
    starting a thread.
    """

    request_queue_size = 128   # listen backlog: WAHA bursts after a reconnect
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, app):
        self.app = app
        self.connections = {}   # socket -> busy flag, so shutdown can close idle keep-alives
        self.conn_lock = threading.Lock()
        self.draining = False
        self.active = 0         # connections with a handler thread
        self.max_connections = app.config.get("server.maxConnections")
        self.request_timeout = app.config.get("server.requestTimeoutSeconds")
        self.refused_logged = 0.0
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        with self.conn_lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self.conn_lock:
                self.active -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conn_lock:
                self.active -= 1

    def _refuse(self, request):
        """Answer 503 from the accept loop and close: no thread is started for the connection."""
        self.app.metrics.inc("whatsignal_rejected_total", reason="connections")
        with contextlib.suppress(OSError):
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.recv(65536)            # what has arrived already: closing on unread data resets the 503
            request.send(BUSY_RESPONSE)
        self.shutdown_request(request)
        now = time.monotonic()
        if now - self.refused_logged > 10:     # under a flood: one line per 10 s, the metric counts each
            self.refused_logged = now
            self.app.log.warn("connection refused: server.maxConnections reached", limit=self.max_connections)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            return                                   # the client went away: nothing to report
        self.app.log.error("internal error in the HTTP server", error=exc.__class__.__name__, where=_where(exc))

    def close_idle(self):
        with self.conn_lock:
            for sock, busy in list(self.connections.items()):
                if not busy:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def busy_count(self):
        with self.conn_lock:
            return sum(1 for b in self.connections.values() if b)


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: ``do_GET``/``do_POST`` route to ``route_<name>``; errors become 4xx/503 here only."""

    protocol_version = "HTTP/1.1"
    server_version = "WhatSignal/" + __version__
    sys_version = ""
    timeout = READ_TIMEOUT          # idle keep-alive and slow senders cannot pin a thread longer
    error_content_type = "application/json"
    error_message_format = '{"error": "%(message)s"}'

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()                 # reads go through the request deadline instead
        kernel = kernel_timeouts(self.connection, self.timeout)
        if kernel:
            self.wfile = _SocketWriter(self.connection)
        self.reader = _DeadlineReader(self.connection, self.timeout, kernel)
        self.reader.deadline = time.monotonic() + self.server.request_timeout   # the first request: from accept
        self.rfile = io.BufferedReader(self.reader, 65536)
        with self.server.conn_lock:
            self.server.connections[self.connection] = False

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.conn_lock:
            self.server.connections.pop(self.connection, None)

    def log_message(self, fmt, *args):
        pass   # requests are counted in /metrics; bodies and addresses never reach the log

    _date = (0, "")

    def date_time_string(self, timestamp=None):
        """The Date header, formatted once a second rather than for every response."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        if Handler._date[0] != now:
            Handler._date = (now, super().date_time_string(now))
        return Handler._date[1]

    def parse_request(self):
        # busy from the request line on, not while waiting for one.  Only this thread sets its connection's
        # value, between setup and finish, which add and remove the key under the lock; a value set on a key
        # that is there is one atomic step, and close_idle copies the items under the lock
        self.server.connections[self.connection] = True
        if self.server.draining:
            self.close_connection = True
        rfile, self.rfile = self.rfile, _NoHeaders      # the request line by the standard library, headers below
        try:
            ok = super().parse_request()                # False: the request line was refused (answered)
        except _HeadersNext:
            ok = True
        finally:
            self.rfile = rfile
        if ok:
            ok = self._parse_headers()
        if self.server.draining:
            self.close_connection = True
        return ok

    def _parse_headers(self):
        """Read the header block; then what ``BaseHTTPRequestHandler.parse_request`` does with Connection and Expect."""
        lines = []
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line)
            if len(lines) >= MAX_HEADERS:
                self.send_error(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
                return False
        self.headers = parse_header_block(lines)
        conntype = (self.headers.get("Connection") or "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        if ((self.headers.get("Expect") or "").lower() == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def handle_one_request(self):
        if self.reader.deadline is None:   # kept alive: wait idle, then the deadline runs from the first byte
            try:
                first = self.rfile.peek(1)
            except OSError:
                first = b""
            if not first:
                self.close_connection = True
                return
            self.reader.deadline = time.monotonic() + self.server.request_timeout
        try:
            super().handle_one_request()
        finally:
            self._received()
            self.server.connections[self.connection] = False     # idle again (see parse_request)

    def _received(self):
        """The request has been read: answering and the next idle wait are not under its deadline."""
        with contextlib.suppress(OSError):
            self.reader.received()

    def send_error(self, code, message=None, explain=None):
        """Malformed request lines and headers: a short JSON reason, counted, never a traceback."""
        self.server.app.metrics.inc("whatsignal_rejected_total", reason="http_%d" % code)
        self.close_connection = True
        self.reply(code, {"error": shorten(message or http.HTTPStatus(code).phrase, 80)})

    _ok = (0, b"")

    def reply(self, status, obj, headers=None, content_type="application/json", close=False):
        if hasattr(self, "reader"):
            self._received()
        body = obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode()
        if status == 200 and not headers and content_type == "application/json" and not (close or self.close_connection) \
                and self.command == "POST" and getattr(self, "request_version", "HTTP/0.9") != "HTTP/0.9":
            # a webhook's answer: the same bytes send_response and send_header would write, in one piece
            now = int(time.time())
            if Handler._ok[0] != now:
                Handler._ok = (now, ("%s 200 OK\r\nServer: %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
                                     % (self.protocol_version, self.version_string(), self.date_time_string())
                                     ).encode("latin-1", "strict"))
            self.wfile.write(Handler._ok[1] + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return self._count(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close or self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        if getattr(self, "request_version", "") == "HTTP/0.9" or not hasattr(self, "_headers_buffer"):   # garbage: body only
            self.end_headers()
            self.wfile.write(body)
            return self._count(status)
        self._headers_buffer.append(b"\r\n")          # end_headers, with the body in the same write
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()
        self._count(status)

    def _route_path(self):
        """The request's path without its query; the webhook's own path is taken as it is, unparsed."""
        path = getattr(self, "path", None)
        if not isinstance(path, str):
            return "?"
        return path if path == WEBHOOK_PATH else urllib.parse.urlsplit(path).path

    def _count(self, status):
        path = self._route_path()
        known = path if path in (WEBHOOK_PATH, "/health", "/healthz", "/readyz", "/metrics") else "other"
        self.server.app.metrics.inc("whatsignal_http_requests_total", path=known, status=str(status))

    def do_GET(self):
        path = self._route_path()
        route = {"/healthz": self.route_healthz, "/health": self.route_health, "/readyz": self.route_readyz,
                 "/metrics": self.route_metrics}.get(path)
        if route is None:
            self.reply(404, {"error": "not found"})
        else:
            route()

    do_HEAD = do_GET

    def do_POST(self):
        path = self._route_path()
        if path not in (WEBHOOK_PATH, WEBHOOK_PATH + "/"):
            self._discard_or_close()
            self.reply(404, {"error": "not found"})
            return
        try:
            with self.server.app.bridge.intake:
                self.route_webhook()
        except (ConnectionError, socket.timeout):    # the client hung up mid-request or mid-answer
            self.close_connection = True
        except Exception as e:  # never a 500 body with internals; logged once with the place
            self.server.app.log.error("internal error handling a webhook", error=e.__class__.__name__, where=_where(e))
            self.reply(500, {"error": "internal error"}, close=True)

    def _discard_or_close(self):
        self.close_connection = True

    def _reject(self, status, reason, close=False, headers=None):
        app = self.server.app
        app.metrics.inc("whatsignal_rejected_total", reason=reason.split(":")[0][:40])
        app.log.warn("webhook rejected", status=status, reason=reason)
        self.reply(status, {"error": reason}, headers=headers, close=close)

    def route_webhook(self):
        app = self.server.app
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._reject(411, "chunked bodies are not accepted; send Content-Length", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            return self._reject(411, "Content-Length required", close=True)
        if not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            return self._reject(400, "invalid Content-Length", close=True)
        length = int(length)
        if length > app.max_body:
            return self._reject(413, "body over %d bytes" % app.max_body, close=True)
        if ctype != "application/json":
            return self._reject(415, "Content-Type must be application/json", close=True)
        signature = self.headers.get("X-Webhook-Hmac") or ""
        if not SIGNATURE_SHAPE.fullmatch(signature.strip()) or \
                (self.headers.get("X-Webhook-Hmac-Algorithm") or "sha512").lower() != "sha512":
            return self._auth_failed(close=True)          # no body is read for a request that cannot be signed
        if not app.body_budget.take(length):
            return self._reject(503, "busy: too many request bodies in flight; retry later", close=True,
                                headers={"Retry-After": "5"})
        try:
            body = self.rfile.read(length)
            signed = verify_waha_signature(app.webhook_secret, body, signature,
                                           self.headers.get("X-Webhook-Hmac-Algorithm"))
        except OSError:   # deadline passed or reset: a slow or vanished client, not an internal error
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._reject(408, "request body not received in time", close=True)
            return
        finally:
            app.body_budget.give(length)
        self._received()
        if len(body) < length:
            self.close_connection = True
            return self._reject(400, "body shorter than Content-Length", close=True)
        if not signed:
            return self._auth_failed()
        try:
            event = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return self._reject(400, "malformed JSON")
        try:
            result = app.bridge.ingest_webhook(event)
        except PayloadError as e:
            return self._reject(400, "invalid payload: %s" % shorten(str(e), 100))
        except (StoreError, CryptoError) as e:
            if isinstance(e, CryptoError):
                app.metrics.inc("whatsignal_encryption_errors_total")
            app.log.error("webhook not stored; answering 503 so WAHA retries", reason=scrub(e))
            return self.reply(503, {"error": "storage unavailable, retry later"}, headers={"Retry-After": "5"})
        except RecursionError:
            return self._reject(400, "payload nested too deeply")
        self.reply(200, {"status": result})

    def _auth_failed(self, close=False):
        app = self.server.app
        client = self.client_address[0] if self.client_address else "?"
        app.metrics.inc("whatsignal_webhook_auth_failures_total")
        if app.throttle.blocked(client):
            return self._reject(429, "too many failed signatures", close=close,
                                headers={"Retry-After": str(int(AUTH_FAIL_WINDOW))})
        app.throttle.fail(client)
        app.log.warn("webhook authentication failed", reason="missing or wrong X-Webhook-Hmac")
        return self.reply(401, {"error": "authentication failed"}, close=close)

    def route_healthz(self):
        self.reply(200, {"status": "ok"})

    def _bearer_ok(self):
        """True when the request carries server.metricsToken as a bearer token (False when none is configured)."""
        token = self.server.app.config.get("server.metricsToken")
        return bool(token) and hmac.compare_digest((self.headers.get("Authorization") or "").encode(),
                                                   ("Bearer " + token).encode())

    def route_health(self):
        status, report = self.server.app.health(details=self._bearer_ok())
        self.reply(503 if report["status"] == "unhealthy" else 200, report)

    def route_readyz(self):
        ready, report = self.server.app.readiness(details=self._bearer_ok())
        self.reply(200 if ready else 503, report)

    def route_metrics(self):
        app = self.server.app
        if app.config.get("server.metricsToken") and not self._bearer_ok():
            return self.reply(401, {"error": "metrics token required"}, headers={"WWW-Authenticate": "Bearer"})
        app.refresh_gauges()
        self.reply(200, app.metrics.render().encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

###############################################################################
# Operations ##################################################################
###############################################################################

MEDIA_NAME = re.compile(r"^m-[0-9a-f]{32}\.[a-z0-9]{1,5}$")


def media_name(row):
    """The cache file name (without extension) of queued item *row*: see Bridge.media_path."""
    return "m-" + hashlib.sha256(("%d/%r" % (row["id"], row["created_at"])).encode()).hexdigest()[:32]


def make_private_dir(path):
    """Create *path* (and its parents) readable by this user only, whatever the umask."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)


def create_private_file(path):
    """Create *path* empty, readable and writable by this user only, whatever the umask (if it is new)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def readable_by_others(paths):
    """The paths among *paths* that other users can read or enter (group or world permission bits)."""
    out = []
    for p in paths:
        with contextlib.suppress(OSError):
            if os.stat(p).st_mode & 0o077:
                out.append(p)
    return out


def private_files_warning(db_path, cache_dir):
    """One line naming the database files and media cache other users can read, with the fix; None if none."""
    files = readable_by_others([db_path, db_path + "-wal", db_path + "-shm"])
    dirs = readable_by_others([cache_dir]) if cache_dir else []
    if not files and not dirs:
        return None
    fix = "; ".join(f for f in ("chmod 600 " + " ".join(files) if files else "",
                                "chmod 700 " + " ".join(dirs) if dirs else "") if f)
    return "readable by other users: %s (fix: %s)" % (", ".join(files + dirs), fix)


RETENTION_SWEEPS = (   # table, what is old enough to go (never a pending queue item)
    ("queue", ENDED + " AND updated_at < ?"),
    ("messages", "created_at < ?"),
    ("chats", "last_at < ?"),
    ("contacts", "updated_at < ?"),
    ("lids", "updated_at < ?"),
    ("state", "(key LIKE 's2w-progress:%' OR key LIKE 'call:%' OR key LIKE 'poll:%') AND updated_at < ?"),
)


def cleanup(store, config, now, vacuum=False, batch=500, pause=0.0):
    """Delete what is older than the retention periods, in short batches; return counts.

    Pending items are never deleted.  Media cache files are removed by age
    (only files the bridge named).  Space is reclaimed with incremental_vacuum
    (or VACUUM when asked) and the WAL is checkpointed.
    """
    cutoff = now - config.get("retentionDays") * 86400
    counts = {}
    for table, where in RETENTION_SWEEPS:
        total = 0
        while True:
            with store.tx() as db:
                n = db.execute("DELETE FROM %s WHERE rowid IN (SELECT rowid FROM %s WHERE %s LIMIT ?)"
                               % (table, table, where), (cutoff, batch)).rowcount
            total += n
            if n < batch:
                break
            if pause:
                time.sleep(pause)   # let webhook writers in between batches
        counts[table] = total
    media_days = config.get("media.retentionDays") or config.get("retentionDays")
    counts["media_files"] = sweep_media(config.get("media.cacheDir"), now - media_days * 86400)
    with store.lock:
        if vacuum:
            store.db.execute("VACUUM")
        else:
            store.db.executescript("PRAGMA incremental_vacuum;")   # stepped to the end, not one page
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return counts


def sweep_media(cache_dir, cutoff):
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache_dir):
            if entry.is_file(follow_symlinks=False) and MEDIA_NAME.match(entry.name) \
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
                    removed += 1
    return removed


def media_stats(cache_dir):
    count = size = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache_dir):
            if entry.is_file(follow_symlinks=False):
                count += 1
                size += entry.stat(follow_symlinks=False).st_size
    return count, size


def run_cleanup(app, vacuum=False):
    """One logged, measured sweep (timer, CLI)."""
    start = time.monotonic()
    try:
        counts = cleanup(app.store, app.config, app.clock(), vacuum=vacuum, pause=0.001)
    except (StoreError, sqlite3.Error, OSError) as e:
        app.metrics.inc("whatsignal_cleanup_failures_total")
        app.log.error("cleanup failed", reason=scrub(e))
        return None
    took = time.monotonic() - start
    app.metrics.set("whatsignal_cleanup_duration_seconds", took)
    app.metrics.set("whatsignal_cleanup_last_success_timestamp_seconds", app.clock())
    with contextlib.suppress(StoreError):
        app.store.set_meta("last_cleanup", json.dumps({"at": app.clock(), "removed": counts, "seconds": round(took, 3)}))
    app.refresh_gauges()
    app.log.info("Successfully completed cleanup", duration_s=round(took, 3), **{"removed_" + k: v for k, v in counts.items()})
    return counts


def table_counts(db):
    out = {}
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name").fetchall():
        out[name] = db.execute('SELECT COUNT(*) FROM "%s"' % name.replace('"', '')).fetchone()[0]
    return out


def backup(db_path, dest, config=None):
    """Copy *db_path* to *dest* with SQLite's online backup API, check it; return a report dict."""
    if not os.path.exists(db_path):
        raise WhatSignalError("database %s does not exist; check database.path" % db_path)
    if dest.endswith(("/", os.sep)):
        make_private_dir(dest)
    dest = os.path.abspath(dest)
    if os.path.isdir(dest):
        dest = os.path.join(dest, "whatsignal-%s.db" % time.strftime("%Y%m%d-%H%M%S"))
    tmp = dest + ".partial"
    create_private_file(tmp)   # a backup holds everything the database does: 0600, whatever the umask
    src = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db_path)), uri=True, timeout=30)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)   # one read transaction: in WAL mode writers continue meanwhile, and it cannot restart
        dst.execute("PRAGMA journal_mode=DELETE")
        check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        counts = table_counts(dst)
    finally:
        dst.close()
        src.close()
    if check != "ok":
        os.remove(tmp)
        raise WhatSignalError("the copy failed its integrity check (%s); the source may be damaged, run verify" % check)
    os.replace(tmp, dest)
    report = {"backup": dest, "bytes": os.path.getsize(dest), "integrity": check, "rows": counts}
    if config is not None:
        create_private_file(dest + ".config.json")
        with open(dest + ".config.json", "w", encoding="utf-8") as f:
            json.dump(config.masked(), f, indent=2)
        report["config"] = dest + ".config.json"
    return report


def verify(db_path, config):
    """Integrity, schema version and key check of a database file; return (ok, report)."""
    if not os.path.exists(db_path):
        return False, {"database": db_path, "error": "file not found"}
    db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db_path)), uri=True, timeout=30)
    try:
        report = {"database": db_path, "integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
                  "schema_version": db.execute("PRAGMA user_version").fetchone()[0]}
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in table_counts(db) else {}
    except sqlite3.DatabaseError as e:
        return False, {"database": db_path, "error": "not a readable SQLite database (%s)" % e}
    finally:
        db.close()
    if "salt" not in meta or "key_check" not in meta:
        report["key"] = "no key check value (not a WhatSignal database?)"
        return False, report
    loose = private_files_warning(db_path, config.get("media.cacheDir"))
    if loose:
        report["warning"] = loose
    try:
        n, r, p = kdf_params(meta.get("kdf"), True)
    except CryptoError as e:
        report["key"] = str(e)
        return False, report
    cipher = Cipher(config.encryption_secret or "", bytes.fromhex(meta["salt"]), enabled=config.encryption, n=n, r=r, p=p)
    report["key"] = "opens" if cipher.key_check() == meta["key_check"] else "does NOT open this database"
    if meta.get("rotation"):
        report["key"] += " (a key rotation is unfinished: run rotate-key again)"
    ok = report["integrity"] == "ok" and report["schema_version"] <= len(SCHEMA) and report["key"] == "opens"
    return ok, report


def restore(db_path, src, config, clock=time.time):
    """Replace *db_path* with the verified backup *src*; the current file is kept beside it."""
    ok, report = verify(src, config)
    if not ok:
        raise WhatSignalError("refusing to restore: %s does not verify (%s)" % (src, json.dumps(report)))
    if os.path.exists(db_path):
        store = Store(db_path)
        try:
            running = store.serving(clock()) or [h for h in [store.lease_holder(clock())] if h]
            if running:
                raise WhatSignalError("refusing to restore: WhatSignal is running on %s (%s); stop it (and every other instance) first"
                                      % (db_path, ", ".join(sorted({h.split(":")[0] for h in running}))))
            with store.lock:
                store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            store.close()
    tmp = db_path + ".restoring"
    create_private_file(tmp)
    s, d = sqlite3.connect(src), sqlite3.connect(tmp)
    try:
        s.backup(d)
    finally:
        d.close()
        s.close()
    kept = None
    if os.path.exists(db_path):
        kept = db_path + ".before-restore-" + time.strftime("%Y%m%d-%H%M%S")
        os.replace(db_path, kept)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(db_path + suffix)
    os.replace(tmp, db_path)
    return {"restored": db_path, "from": src, "previous_kept_as": kept}


def rotate_key(store, old_secret, new_secret, enabled=True, batch=500, progress=None, cache_dir=None):
    """Re-encrypt every sealed value and recompute every lookup token (SEALED, TOKENS); resumable. Return totals.

    Values written before schema version 5 (no associated data) are read too, and come out bound; media
    a release before it cached for a waiting item under its dedupe token (in *cache_dir*) is renamed
    to the name rotation does not change.
    """
    salt = store.salt()
    n, r, p = store.kdf()     # the old key as the database records it; the new one with today's parameters
    old = Cipher(old_secret, salt, enabled=store.meta("key_check", "").startswith("enc1:"), n=n, r=r, p=p)
    new = Cipher(new_secret, salt, enabled=enabled)
    if store.meta("key_check") not in (old.key_check(), new.key_check()):
        raise CryptoError("WHATSIGNAL_ENCRYPTION_SECRET_OLD does not open this database; give the secret it was created with")
    store.set_meta("rotation", new.key_check())
    totals = {}
    for table, where in ROTATION_DROPS.items():   # token caches without a sealed source: refilled from WAHA
        with store.tx() as db:
            totals[table] = db.execute("DELETE FROM %s WHERE %s" % (table, where)).rowcount
    for table in SEALED:
        if table not in ROTATION_DROPS or table == "state":
            totals[table] = totals.get(table, 0) + _rotate_table(store, table, old, new, batch, progress, cache_dir)
    with store.tx() as db:
        db.execute("UPDATE meta SET value=? WHERE key='key_check'", (new.key_check(),))
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('kdf', ?)", (kdf_record(SCRYPT_N, SCRYPT_R, SCRYPT_P),))
        db.execute("DELETE FROM meta WHERE key IN ('rotation', 'reseal')")
    store.cipher = new
    return totals


def _rotate_table(store, table, old, new, batch, progress, cache_dir=None):
    keycols, cols = SEALED[table]
    done, last = 0, -1
    while True:
        rows = store.query("SELECT rowid AS rid, * FROM %s WHERE rowid > ? ORDER BY rowid LIMIT ?" % table, (last, batch))
        if not rows:
            return done
        with store.tx() as db:
            for r in rows:
                last = r["rid"]
                present = [c for c in cols if r[c] is not None]
                if not present:
                    continue
                ctx = lambda row, c: seal_context(table, c, *[row[k] for k in keycols])
                try:
                    new.decrypt_bytes(r[present[0]], ctx(r, present[0]))
                    continue   # already rotated in an earlier, interrupted run
                except CryptoError:
                    pass
                plain = {c: old.decrypt_legacy(r[c], ctx(r, c)) for c in present}
                row = dict(r)
                row.update(_tokens(table, plain, new, row))
                sets = {c: row[c] for c in TOKENS.get(table, {}) if c in row and TOKENS[table][c][1]}
                sets.update({c: new.encrypt(plain[c], ctx(row, c)) for c in present})
                if table == "queue" and cache_dir and r["state"] == "pending":
                    for ext in set(EXTENSIONS.values()) | {".bin"}:
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(os.path.join(cache_dir, "m-%s%s" % (r["dedupe"], ext)),
                                       os.path.join(cache_dir, media_name(r) + ext))
                db.execute("UPDATE %s SET %s WHERE rowid=?" % (table, ", ".join("%s=?" % c for c in sets)),
                           list(sets.values()) + [r["rid"]])
                done += 1
        if progress:
            progress(table, done)


def _tokens(table, plain, cipher, row):
    """The tokens of one row under *cipher*, from its opened sealed values (TOKENS)."""
    out, records = {}, {}
    for column, (domain, source) in TOKENS.get(table, {}).items():
        if source is None:
            continue
        sealed, _, field = source.partition(".")
        if plain.get(sealed) is None:
            if column == "wa_sender":
                out[column] = None   # author not kept before schema 5: the edit check falls back as for older rows
            continue
        value = plain[sealed].decode("utf-8", "surrogatepass")
        if field:
            value = (records.get(sealed) or records.setdefault(sealed, json.loads(value))).get(field)
        if domain == "msg":
            value = bare_msg_id(value)
        out[column] = cipher.token(domain, value) if value is not None else None
    return out


def stats(store, config, now):
    """Counts and sizes, nothing decrypted."""
    out = {"tables": table_counts(store.db), "queue": {}}
    for (direction, state), (n, oldest) in sorted(store.counts().items()):
        entry = out["queue"].setdefault(direction, {})
        entry[state] = n
        if state == "pending":
            entry["oldest_pending_age_s"] = round(now - oldest, 1)
    out["dead_letters"] = sum(n for (d, s), (n, _) in store.counts().items() if s == "dead")
    out["database_bytes"] = os.path.getsize(store.path) if os.path.exists(store.path) else 0
    out["wal_bytes"] = os.path.getsize(store.path + "-wal") if os.path.exists(store.path + "-wal") else 0
    out["media_files"], out["media_bytes"] = media_stats(config.get("media.cacheDir"))
    last = store.meta("last_cleanup")
    out["last_cleanup"] = json.loads(last) if last else None
    out["catch_up"] = {r[0]: json.loads(r[1]) for r in store.query(
        "SELECT channel, value FROM state WHERE key='catchup_last' ORDER BY channel")}
    return out


def outbox(store, now, retry=None):
    """List dead letters, or put them (``retry`` = id or 'all') back in the queue."""
    if retry is not None:
        where, args = ("state='dead' AND " + ENDED, ()) if retry == "all" else ("state='dead' AND id=?", (int(retry),))
        with store.tx() as db:
            n = db.execute("UPDATE queue SET state='pending', attempts=0, next_at=?, created_at=?, updated_at=?"
                           " WHERE " + where, (now, now, now) + args).rowcount
        return {"requeued": n}
    rows = store.query("SELECT id, direction, kind, attempts, created_at, error FROM queue WHERE state='dead' AND "
                       + ENDED + " ORDER BY id")
    return {"dead": [{"id": r[0], "direction": r[1], "kind": r[2], "attempts": r[3],
                      "age_s": round(now - r[4]), "error": r[5]} for r in rows]}


###############################################################################
# Application #################################################################
###############################################################################


class App:
    """The object graph of a running bridge: store, clients, bridge, workers, server."""

    def __init__(self, config, log, clock=time.time, rand=random.random, holder=None):
        self.config, self.log, self.clock, self.rand = config, log, clock, rand
        self.metrics = new_metrics()
        self.max_body = config.get("server.maxBodyMB") * 1024 * 1024
        self.webhook_secret = config.get("whatsapp.webhookSecret")
        self.throttle = AuthThrottle()
        self.body_budget = BodyBudget(self.max_body + BODY_RESERVE)
        self.store = Store(config.get("database.path"), config.get("database.synchronous"))
        try:
            self.store.unlock(config.encryption_secret, enabled=config.encryption)
        except CryptoError:
            self.store.close()
            raise
        self.waha = WahaClient(config.get("whatsapp.apiUrl"), config.get("whatsapp.apiKey"),
                               media_base=config.get("whatsapp.mediaBaseUrl"))
        if config.get("signal.rpcUrl"):
            self.signal = SignalRpcClient(config.get("signal.rpcUrl"), config.get("signal.number"),
                                          attachment_dir=config.get("signal.attachmentDir"))
        else:
            self.signal = SignalRestClient(config.get("signal.apiUrl"), config.get("signal.number"))
        self.signal.log = log
        self.bridge = Bridge(config, self.store, self.waha, self.signal, log, self.metrics, clock, rand)
        self.lease = LeaseKeeper(self.store, log, self.metrics, clock, holder)
        self.workers = [MediaPrefetcher(self.bridge, self.lease.leader), CatchUp(self.bridge, self.lease.leader),
                        Deliverer(self.bridge, "w2s", self.lease.leader), Deliverer(self.bridge, "s2w", self.lease.leader),
                        SignalReceiver(self.bridge, self.lease.leader), SessionWatcher(self.bridge, self.lease.leader)]
        self.server = None
        self.timer = None
        self.stopped = False
        self.health_cache = {}
        self.health_locks = collections.defaultdict(threading.Lock)   # one check per upstream at a time
        self.media_cache = (0.0, (0, 0))

    def start(self):
        host, port = self.config.get("server.host"), self.config.get("server.port")
        try:
            self.server = BridgeServer((host, port), self)
        except OSError as e:
            raise WhatSignalError("cannot listen on %s:%d (%s); pick a free server.port or stop what uses it"
                                  % (host, port, e.strerror or e))
        # stop() waits out one poll interval; 50 ms keeps that short (20 idle wake-ups a second cost ~0.02 % CPU)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True).start()
        self.lease.tick()          # take the lease now, so delivery starts without waiting a lease period
        self.lease.start()
        for w in self.workers:
            w.start()
        self._schedule_cleanup(min(60.0, self.config.get("cleanupIntervalHours") * 3600))
        loose = private_files_warning(self.store.path, self.config.get("media.cacheDir"))
        if loose:
            self.log.warn(loose)
        if not self.config.encryption:
            self.log.warn("encryption at rest is DISABLED (WHATSIGNAL_ENABLE_ENCRYPTION=false): messages and numbers "
                          "are stored in plaintext")
        self.log.info("WhatSignal started", version=__version__, listen="%s:%d" % self.server.server_address[:2],
                      signal=self.signal.kind, channels=len(self.config.channels), layout=self.config.get("bridge.layout"))
        return self

    @property
    def url(self):
        return "http://%s:%d" % self.server.server_address[:2]

    def _schedule_cleanup(self, delay):
        self.timer = threading.Timer(delay, self._cleanup_tick)
        self.timer.daemon = True
        self.timer.start()

    def _cleanup_tick(self):
        try:
            if self.lease.leader.is_set() and not self.stopped:
                run_cleanup(self)
        except Exception as e:  # pragma: no cover - the timer must survive anything
            self.log.error("cleanup failed", reason=e.__class__.__name__)
        finally:
            if not self.stopped:
                self._schedule_cleanup(self.config.get("cleanupIntervalHours") * 3600)

    def stop(self, timeout=8.0):
        """Stop accepting, let in-flight requests finish, stop workers, close the database."""
        deadline = time.monotonic() + timeout
        self.stopped = True
        if self.timer:
            self.timer.cancel()
        if self.server:
            self.server.draining = True
            self.server.shutdown()
            self.server.close_idle()
            while self.server.busy_count() and time.monotonic() < deadline - 3:
                time.sleep(0.02)
                self.server.close_idle()
            self.server.server_close()
        for w in reversed(self.workers):   # the receiver first: what it has read is stored before the end
            w.stop(max(0.5, deadline - time.monotonic() - 1.0))
        self.lease.stop(1.0)
        self.lease.release()       # also when its thread was slow to end: the next instance must not wait
        self.store.close()
        self.log.info("WhatSignal stopped")

    # -- health and gauges ---------------------------------------------------
    def _check(self, name, fn):
        """One cached check; when the cache has expired, one request runs it and the others wait for its result."""
        cached = self.health_cache.get(name)
        if cached and time.monotonic() - cached[0] < HEALTH_CACHE_SECONDS:
            return cached[1]
        with self.health_locks[name]:
            cached = self.health_cache.get(name)
            if cached and time.monotonic() - cached[0] < HEALTH_CACHE_SECONDS:
                return cached[1]                     # computed while this request waited
            start = time.monotonic()
            try:
                fn()
                result = {"status": "ok"}
            except (UpstreamError, StoreError, sqlite3.Error, OSError) as e:
                result = {"status": "error", "error": scrub(e, 120), "kind": _public_error(e)}
            result["latency_ms"] = round((time.monotonic() - start) * 1000, 1)
            self.health_cache[name] = (time.monotonic(), result)
            return result

    def health(self, details=True):
        """(status, report); without *details* a failed check says what failed, never where the upstream lives."""
        checks = {"database": self._check("database", lambda: self.store.one("SELECT COUNT(*) FROM meta")),
                  "whatsapp": self._check("whatsapp", self.waha.ping),
                  "signal": self._check("signal", self.signal.health)}
        checks = {name: {k: (c["kind"] if k == "error" and not details else v) for k, v in c.items() if k != "kind"}
                  for name, c in checks.items()}
        if checks["database"]["status"] != "ok":
            status = "unhealthy"
        elif any(c["status"] != "ok" for c in checks.values()):
            status = "degraded"
        else:
            status = "healthy"
        report = {"status": status, "timestamp": iso_now(self.clock), "version": __version__, "checks": checks,
                  "role": "active" if self.lease.leader.is_set() else "standby"}
        return status, report

    def readiness(self, details=True):
        """(ready, report): ready only when this instance holds the lease and the database and both upstreams answer."""
        status, report = self.health(details)
        waiting = [name for name, c in report["checks"].items() if c["status"] != "ok"]
        if report["role"] != "active":
            waiting.append("lease (another instance is active)")
        report["ready"] = not waiting
        if waiting:
            report["waiting_for"] = waiting
        return not waiting, report

    def refresh_gauges(self):
        with contextlib.suppress(StoreError, sqlite3.Error):
            for d in ("w2s", "s2w"):
                self.metrics.set("whatsignal_queue_depth", self.store.queue_depth(d), direction=d)
        self.metrics.set("whatsignal_database_size_bytes", self.store.size_bytes())
        at, (count, _) = self.media_cache
        if time.monotonic() - at > 30:
            count, size = media_stats(self.config.get("media.cacheDir"))
            self.media_cache = (time.monotonic(), (count, size))
        self.metrics.set("whatsignal_media_files_count", count)
        for name, value in process_stats().items():
            self.metrics.set(name, value)
        space = fs_space(os.path.dirname(os.path.abspath(self.config.get("database.path"))))
        if space:
            self.metrics.set("whatsignal_data_fs_free_bytes", space[0])
            self.metrics.set("whatsignal_data_fs_size_bytes", space[1])
        limit = memory_limit()
        if limit:
            self.metrics.set("whatsignal_memory_limit_bytes", limit)

###############################################################################
# Simulators ##################################################################
###############################################################################
# Small, contract-faithful stand-ins for WAHA and the signal-cli daemon, used
# by `demo` and `bench` (loopback only, ephemeral ports).  The test suite has
# its own, independent fakes.


class _SimHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    nodelay = True       # WAHA is Node's http server, which sets TCP_NODELAY

    def setup(self):
        super().setup()
        if self.nodelay:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *a):
        pass

    def body_json(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def send(self, status, obj=None, ctype="application/json", raw=None):
        body = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _SimServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, handler, sim):
        self.sim = sim
        super().__init__(("127.0.0.1", 0), handler)


class Simulator:
    """Base: a server on 127.0.0.1:0 in a thread, a call log, and a Condition to wait on."""

    handler = _SimHandler

    def __init__(self):
        self.server = _SimServer(self.handler, self)
        self.cond = threading.Condition()
        self.calls = []
        self.listeners = []
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def record(self, call):
        with self.cond:
            self.calls.append(call)
            self.cond.notify_all()
        for fn in self.listeners:
            fn(call)

    def wait(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _WahaSimHandler(_SimHandler):
    def do_GET(self):
        sim = self.server.sim
        path = urllib.parse.urlsplit(self.path).path
        if path == "/ping":
            return self.send(200, {"message": "pong"})
        if self.headers.get("X-Api-Key") != sim.api_key:
            return self.send(401, {"message": "Unauthorized", "statusCode": 401})
        if path in sim.files:
            mime, data = sim.files[path]
            return self.send(200, ctype=mime, raw=data)
        if path.startswith("/api/files/"):
            return self.send(404, {"error": {"code": 404, "key": "FILE_NOT_FOUND", "message": "File not found"}})
        if path == "/api/contacts":
            cid = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("contactId", [""])[0]
            return self.send(200, {"id": cid, "number": cid.split("@")[0], "name": sim.names.get(cid), "pushname": None})
        if "/lids/" in path:
            return self.send(200, {"lid": urllib.parse.unquote(path.rsplit("/", 1)[1]), "pn": None})
        if re.fullmatch(r"/api/[^/]+/chats(/[^/]+/messages)?", path):
            return self.send(200, [])      # no history: a catch-up finds nothing
        if "/groups/" in path:
            gid = urllib.parse.unquote(path.rsplit("/", 1)[1])
            # GOWS getGroup() answers whatsmeow's GroupInfo as is (src/core/engines/gows/session.gows.core.ts)
            return self.send(200, {"JID": gid, "Name": sim.names.get(gid), "Topic": "", "IsLocked": False,
                                   "Participants": []})
        if path.startswith("/api/sessions/"):
            return self.send(200, {"name": "default", "status": "WORKING"})
        self.send(404, {"statusCode": 404, "message": "Cannot GET " + path, "error": "Not Found"})

    def _any(self, method):
        sim = self.server.sim
        if self.headers.get("X-Api-Key") != sim.api_key:
            self.body_json()
            return self.send(401, {"message": "Unauthorized", "statusCode": 401})
        body = self.body_json() or {}
        path = urllib.parse.urlsplit(self.path).path
        wa_id = "true_%s_%s" % (body.get("chatId", "0@c.us"), secrets.token_hex(10).upper())
        sim.record({"method": method, "path": path, "json": body, "at": time.time(), "id": wa_id})
        status = 201 if method == "POST" else 200
        self.send(status, {"id": wa_id, "_data": {}} if path.startswith("/api/send") or path == "/api/reaction"
                  else {"result": True})

    def do_POST(self):
        self._any("POST")

    def do_PUT(self):
        self._any("PUT")

    def do_DELETE(self):
        self._any("DELETE")


class WahaSim(Simulator):
    """WAHA: send endpoints (201, GOWS response shape), contacts, lids, files with X-Api-Key."""

    handler = _WahaSimHandler

    def __init__(self, api_key="sim-waha-key"):
        self.api_key = api_key
        self.files = {}
        self.names = {}
        super().__init__()

    def sends(self):
        with self.cond:
            return [c for c in self.calls if c["path"].startswith("/api/send")]


class _SignalSimHandler(_SimHandler):
    # signal-cli's daemon is the JDK's com.sun.net.httpserver, which leaves Nagle's algorithm on
    # (sun.net.httpserver.nodelay defaults to false) and writes a response's headers and then its
    # body: ``send`` does the same, two writes on a socket without TCP_NODELAY (HttpServerHandler.java)
    nodelay = False

    def do_GET(self):
        sim = self.server.sim
        path = urllib.parse.urlsplit(self.path).path
        if path == "/api/v1/check":
            return self.send(200, raw=b"")
        if path != "/api/v1/events":
            return self.send(404, raw=b"")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        q = sim.subscribe()
        try:
            while not sim.closed:
                try:
                    item = q.get(timeout=sim.keepalive)
                except Exception:   # queue.Empty: keep-alive comment, as signal-cli sends every 15 s
                    self.wfile.write(b":\n")
                    self.wfile.flush()
                    continue
                if item is None:
                    break
                self.wfile.write(b"event:receive\ndata:" + json.dumps(item).encode() + b"\n\n")
                self.wfile.flush()
        except OSError:
            pass
        finally:
            sim.unsubscribe(q)

    def do_POST(self):
        sim = self.server.sim
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self.body_json()
            return self.send(415, raw=b"")
        req = self.body_json()
        if not isinstance(req, dict):
            return self.send(200, {"jsonrpc": "2.0", "error": {"code": -32700, "message": "parse error"}, "id": None})
        if any(len(v) > JSON_STRING_LIMIT for v in _strings(req)):
            # Jackson's string limit fails the reader; the handler's catch-all answers (HttpServerHandler.java)
            return self.send(200, {"jsonrpc": "2.0", "error": {"code": -32603, "message":
                                                                "An internal server error has occurred."}, "id": None})
        params = req.get("params") or {}
        with sim.cond:
            sim.clock_ms = max(sim.clock_ms + 1, int(time.time() * 1000))
            ts = sim.clock_ms
        sim.record({"method": req.get("method"), "params": params, "at": time.time(), "timestamp": ts})
        if req.get("method") == "getAttachment":
            data = sim.attachments.get(params.get("id"))
            if data is None:
                return self.send(200, {"jsonrpc": "2.0", "id": req.get("id"), "error": {
                    "code": -1, "message": "Could not find attachment with ID: %s" % params.get("id"), "data": None}})
            return self.send(200, {"jsonrpc": "2.0", "id": req.get("id"), "result": {"data": base64.b64encode(data).decode()}})
        result = {"timestamp": ts, "results": [{"recipientAddress": {"uuid": None, "number": params.get("recipient", [None])[0]
                                                if isinstance(params.get("recipient"), list) else params.get("recipient"),
                                                "username": None}, "type": "SUCCESS"}]}
        self.send(200, {"jsonrpc": "2.0", "id": req.get("id"), "result": result})


def _strings(obj):
    """Every string in a JSON document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


class SignalSim(Simulator):
    """signal-cli daemon --http: JSON-RPC send/sendReaction/getAttachment..., SSE events, check."""

    handler = _SignalSimHandler

    def __init__(self, number="+15550000001", keepalive=15.0):
        import queue
        self._queue = queue
        self.number = number
        self.keepalive = keepalive
        self.attachments = {}
        self.subscribers = []
        self.backlog = []
        self.closed = False
        self.clock_ms = 0
        super().__init__()

    def subscribe(self):
        q = self._queue.Queue()
        with self.cond:
            for item in self.backlog:
                q.put(item)
            self.backlog = []
            self.subscribers.append(q)
        return q

    def unsubscribe(self, q):
        with self.cond:
            if q in self.subscribers:
                self.subscribers.remove(q)

    def push(self, envelope):
        """Deliver a receive object to the connected stream (held until one connects: on-connection mode)."""
        obj = {"envelope": envelope, "account": self.number}
        with self.cond:
            if self.subscribers:
                self.subscribers[0].put(obj)
            else:
                self.backlog.append(obj)

    def sends(self):
        with self.cond:
            return [c for c in self.calls if c["method"] == "send"]

    def close(self):
        self.closed = True
        with self.cond:
            for q in self.subscribers:
                q.put(None)
        super().close()


def owner_envelope(owner, ts, text=None, quote=None, reaction=None, attachments=None, uuid="0wner-uuid"):
    """Build a current-shape signal-cli envelope (signal-cli-jsonrpc.md section 4) from the owner."""
    dm = {"timestamp": ts, "message": text, "expiresInSeconds": 0, "isExpirationUpdate": False, "viewOnce": False}
    if quote:
        dm["quote"] = {"id": quote[0], "author": quote[1], "authorNumber": quote[1], "authorUuid": None,
                       "text": quote[2], "attachments": []}
    if reaction:
        dm["reaction"] = {"emoji": reaction[0], "targetAuthor": reaction[1], "targetAuthorNumber": reaction[1],
                          "targetAuthorUuid": None, "targetSentTimestamp": reaction[2], "isRemove": False}
    if attachments:
        dm["attachments"] = attachments
    return {"source": owner, "sourceNumber": owner, "sourceUuid": uuid, "sourceName": "Owner", "sourceDevice": 1,
            "timestamp": ts, "serverReceivedTimestamp": ts + 100, "serverDeliveredTimestamp": ts + 150,
            "dataMessage": dm}


def waha_message(chat, text, msg_id=None, push=None, media=None, reply_to=None, participant=None):
    """Build a current-shape WAHA ``message`` event (waha.md section 2.4 / 4.1)."""
    bare = msg_id or secrets.token_hex(11).upper()
    now = time.time()
    payload = {"id": "false_%s_%s%s" % (chat, bare, "_" + participant if participant else ""),
               "timestamp": int(now), "from": chat, "fromMe": False, "source": "app", "body": text, "to": None,
               "participant": participant, "hasMedia": bool(media), "media": media, "ack": 2, "location": None,
               "vCards": None, "ackName": "DEVICE", "replyTo": reply_to,
               "_data": {"Info": {"PushName": push}} if push else {}}
    return {"id": "evt_" + secrets.token_hex(13), "timestamp": int(now * 1000), "event": "message",
            "session": "default", "payload": payload, "engine": "GOWS",
            "me": {"id": "15550000001@c.us", "pushName": "Bridge"},
            "environment": {"version": "2026.7.1", "engine": "GOWS", "tier": "CORE"}}


def post_webhook(url, event, secret, conn=None):
    """POST a signed WAHA webhook; return (status, body). Reuses *conn* (keep-alive) when given."""
    body = json.dumps(event).encode()
    headers = {"Content-Type": "application/json", "X-Webhook-Hmac-Algorithm": "sha512",
               "X-Webhook-Hmac": hmac.new(secret.encode(), body, hashlib.sha512).hexdigest(),
               "X-Webhook-Request-Id": secrets.token_hex(8), "X-Webhook-Timestamp": str(int(time.time() * 1000))}
    u = urllib.parse.urlsplit(url)
    own = conn is None
    conn = conn or http.client.HTTPConnection(u.netloc, timeout=10)
    try:
        conn.request("POST", u.path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


###############################################################################
# Set-up ######################################################################
###############################################################################
# `init` writes config.json and .env, `webhook install|show` configures the WAHA
# session's webhook through WAHA's sessions API, and `doctor` checks every link of
# a set-up, each with the cause and the exact fix when it is broken.

# WAHA's retry policy for the bridge's webhook (waha.md 2.2; the spec's example defaults).
WEBHOOK_RETRIES = {"policy": "exponential", "delaySeconds": 2, "attempts": 15}


class SetupError(WhatSignalError):
    """A set-up step cannot go on; the message says the cause and the fix."""


def read_env_file(path):
    """Return the NAME=value pairs of a .env file (comments, blank lines and ``export`` skipped, quotes removed)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            name, _, value = line.partition("=")
            name = name.strip()
            if name.startswith("export "):
                name = name[7:].strip()
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                out[name] = value
    return out


def env_file_for(config_path):
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), ".env")


def with_env_file(config_path, environ):
    """*environ* plus the variables of the .env beside the config that it does not set (like docker compose)."""
    path = env_file_for(config_path)
    if not os.path.isfile(path):
        return environ
    merged = read_env_file(path)
    merged.update(environ)
    return merged


def webhook_url(config, public_host=None):
    """The URL WAHA posts to: server.publicUrl, or http://<public host or server.host>:<port>/webhook/whatsapp."""
    if config.get("server.publicUrl") and not public_host:
        return config.get("server.publicUrl")
    host = public_host or config.get("server.host")
    if host in ("0.0.0.0", "::", ""):
        raise SetupError("server.host is %s, an address WAHA cannot post to; pass --public-host NAME (the name WAHA "
                         "reaches this bridge by, e.g. whatsignal in the compose stack) or set server.publicUrl" % host)
    return "http://%s:%d%s" % ("[%s]" % host if ":" in host else host, config.get("server.port"), WEBHOOK_PATH)


def desired_webhook(config, url):
    """The webhook entry the bridge wants in the WAHA session's config.webhooks."""
    return {"url": url, "events": list(WAHA_EVENTS), "hmac": {"key": config.get("whatsapp.webhookSecret")},
            "retries": dict(WEBHOOK_RETRIES), "customHeaders": None}


def _is_bridge_hook(hook, url):
    """A webhook of this bridge: the same URL, or an earlier URL of it (same path, another host)."""
    u = hook.get("url") if isinstance(hook, dict) else None
    return isinstance(u, str) and (u == url or urllib.parse.urlsplit(u).path.rstrip("/") == WEBHOOK_PATH)


def webhook_problems(session_config, want):
    """One (problem, fix) per difference between WAHA's session webhooks and *want*; [] when all is right."""
    fix = "run `python3 whatsignal.py webhook install`"
    hooks = [h for h in (session_config or {}).get("webhooks") or [] if isinstance(h, dict)]
    ours = [h for h in hooks if _is_bridge_hook(h, want["url"])]
    if not ours:
        return [("no webhook of the session points to %s, so WhatsApp messages never reach the bridge" % want["url"],
                 fix)]
    out = []
    if len(ours) > 1:
        out.append(("%d webhooks point to the bridge; WAHA would send every event %d times" % (len(ours), len(ours)),
                    fix))
    hook = next((h for h in ours if h.get("url") == want["url"]), ours[0])
    if hook.get("url") != want["url"]:
        out.append(("the webhook posts to %s, not %s" % (hook.get("url"), want["url"]), fix))
    events = hook.get("events") if isinstance(hook.get("events"), list) else []
    missing = [e for e in WAHA_EVENTS if e not in events and "*" not in events]
    if missing:
        out.append(("the webhook lacks the events %s" % ", ".join(missing), fix))
    key = (hook.get("hmac") or {}).get("key") if isinstance(hook.get("hmac"), dict) else None
    if not key:
        out.append(("the webhook has no HMAC key: WAHA sends unsigned requests and the bridge refuses each one (401)",
                    fix))
    elif not hmac.compare_digest(str(key).encode(), want["hmac"]["key"].encode()):
        out.append(("the webhook's HMAC key is not WEBHOOK_SECRET: the bridge refuses every webhook (401)",
                    fix + " (or set WEBHOOK_SECRET to WAHA's key)"))
    if not isinstance(hook.get("retries"), dict):
        out.append(("the webhook has no retry policy: an event WAHA cannot deliver at once is lost", fix))
    return out


def _webhook_matches(hook, want):
    return (hook.get("url") == want["url"] and isinstance(hook.get("events"), list)
            and sorted(hook["events"]) == sorted(want["events"])
            and isinstance(hook.get("hmac"), dict) and hook["hmac"].get("key") == want["hmac"]["key"]
            and hook.get("retries") == want["retries"] and not hook.get("customHeaders"))


def _waha_get(waha, path):
    """(status, JSON body) of a GET on WAHA; SetupError when it cannot be reached."""
    try:
        resp = waha.http.request("GET", waha.base + path, waha._headers(), timeout=5)
    except TransientError as e:
        raise SetupError("cannot reach WAHA at %s (%s); start it (docker compose up -d waha) or correct "
                         "whatsapp.apiUrl" % (waha.base, scrub(e, 80))) from None
    return resp.status, _json_body(resp)


def _waha_key_fix():
    return ("set WAHA_API_KEY in .env to the key WAHA runs with (its WAHA_API_KEY; WAHA prints a generated one "
            "at start: docker compose logs waha | grep -i key)")


def waha_session(waha, session):
    """GET /api/sessions/{session} as a dict; SetupError with the fix for 401 and 404."""
    status, body = _waha_get(waha, "/api/sessions/%s" % urllib.parse.quote(session, safe=""))
    if status == 401:
        raise SetupError("WAHA refused the API key (401); " + _waha_key_fix())
    if status == 404:
        raise SetupError("WAHA has no session %r; create and start it: curl -X POST -H 'X-Api-Key: $WAHA_API_KEY' "
                         "-H 'Content-Type: application/json' -d '{\"name\": \"%s\", \"start\": true}' %s/api/sessions"
                         % (session, session, waha.base))
    if status != 200 or not isinstance(body, dict):
        raise SetupError("WAHA answered %d to GET /api/sessions/%s; check WAHA's log" % (status, session))
    return body


SESSION_FIXES = {
    "SCAN_QR_CODE": "WhatsApp is not linked yet; scan the QR code: open %(waha)s/dashboard, or "
                    "curl -H 'X-Api-Key: $WAHA_API_KEY' '%(waha)s/api/%(s)s/auth/qr?format=image' -o qr.png and scan "
                    "qr.png in WhatsApp > Settings > Linked devices",
    "STOPPED": "start it: curl -X POST -H 'X-Api-Key: $WAHA_API_KEY' %(waha)s/api/sessions/%(s)s/start",
    "FAILED": "restart it: curl -X POST -H 'X-Api-Key: $WAHA_API_KEY' %(waha)s/api/sessions/%(s)s/restart "
              "(if it fails again, log out and scan the QR code anew)",
    "STARTING": "wait a minute and run doctor again; if it stays STARTING, see docker compose logs waha",
    "PASSKEY_REQUIRED": "confirm the login on the phone (WhatsApp asks for the passkey), then run doctor again",
    "PASSKEY_CONFIRMATION_REQUIRED": "confirm the login on the phone, then run doctor again",
}


def describe_hook(hook, url):
    h = hook if isinstance(hook, dict) else {}
    retries = h.get("retries") if isinstance(h.get("retries"), dict) else None
    events = h.get("events") if isinstance(h.get("events"), list) else []
    return "%s  events: %s  HMAC: %s  retries: %s%s" % (
        h.get("url"), ", ".join(str(e) for e in events) or "none",
        "set" if isinstance(h.get("hmac"), dict) and h["hmac"].get("key") else "none",
        "%s %ss x%s" % (retries.get("policy"), retries.get("delaySeconds"), retries.get("attempts")) if retries else "none",
        "   <- this bridge" if _is_bridge_hook(h, url) else "")


def webhook_show(config, waha, session, url, out):
    """Print the session's webhooks and one line per difference; return the number of differences."""
    info = waha_session(waha, session)
    hooks = (info.get("config") or {}).get("webhooks") or []
    print("session %s (%s): %d webhook%s" % (session, info.get("status"), len(hooks), "" if len(hooks) == 1 else "s"),
          file=out)
    for hook in hooks:
        print("  " + describe_hook(hook, url), file=out)
    problems = webhook_problems(info.get("config"), desired_webhook(config, url))
    for problem, fix in problems:
        print("DIFF %s; fix: %s" % (problem, fix), file=out)
    if not problems:
        print("ok: the webhook matches what the bridge expects (%s, %d events, HMAC, retries)"
              % (url, len(WAHA_EVENTS)), file=out)
    return len(problems)


def webhook_install(config, waha, session, url, out, err, confirm=None):
    """Put the bridge's webhook into the WAHA session's config, keeping the others; return True if WAHA changed."""
    info = waha_session(waha, session)
    cfg = dict(info.get("config") or {})
    hooks = [h for h in cfg.get("webhooks") or [] if isinstance(h, dict)]
    want = desired_webhook(config, url)
    ours = [h for h in hooks if _is_bridge_hook(h, url)]
    if len(ours) == 1 and _webhook_matches(ours[0], want):
        print("session %s: the webhook is already right (%s, %d events, HMAC, retries); nothing changed"
              % (session, url, len(WAHA_EVENTS)), file=out)
        return False
    if info.get("status") != "STOPPED":
        # src/api/sessions.controller.ts (update): a running session is stopped, its config replaced, then started
        print("warning: WAHA stops and restarts session %s (now %s) to apply a config change; WhatsApp stays "
              "linked and messages that arrive meanwhile come in after the restart" % (session, info.get("status")),
              file=err)
        if confirm is not None and not confirm():
            raise SetupError("nothing changed; run again and answer y, or pass --yes")
    cfg["webhooks"] = [h for h in hooks if not _is_bridge_hook(h, url)] + [want]
    try:
        resp = waha.http.request("PUT", waha.base + "/api/sessions/%s" % urllib.parse.quote(session, safe=""),
                                 waha._headers({"Content-Type": "application/json"}),
                                 json.dumps({"config": cfg}).encode(), timeout=60)
    except TransientError as e:
        raise SetupError("WAHA did not answer the update (%s); run webhook show to see what it holds" % scrub(e, 80))
    if resp.status != 200:
        raise SetupError("WAHA refused the update (%d: %s)" % (resp.status, _waha_reason(resp)))
    left = webhook_problems(waha_session(waha, session).get("config"), want)
    if left:
        raise SetupError("WAHA took the update but still differs: %s" % left[0][0])
    kept = len(cfg["webhooks"]) - 1
    print("session %s: webhook installed: %s (events %s; HMAC key = WEBHOOK_SECRET; retries %s %ds x%d)%s"
          % (session, url, ", ".join(WAHA_EVENTS), WEBHOOK_RETRIES["policy"], WEBHOOK_RETRIES["delaySeconds"],
             WEBHOOK_RETRIES["attempts"], "; %d other webhook%s kept" % (kept, "" if kept == 1 else "s") if kept else ""),
          file=out)
    return True


# -- doctor ------------------------------------------------------------------


class CheckFailed(WhatSignalError):
    """One doctor check failed: ``cause`` and ``fix``."""

    def __init__(self, cause, fix):
        super().__init__(cause)
        self.cause, self.fix = cause, fix


class Doctor:
    """Runs the set-up checks in order, one line each: ``ok  name: detail`` or ``FAIL  name: cause; fix: ...``."""

    def __init__(self, config, config_path, environ, out, send_test=False):
        self.config, self.config_path, self.environ, self.out = config, config_path, environ, out
        self.send_test = send_test
        self.failed = 0
        self.last_event = {}     # WAHA session -> when the bridge last stored an event from it
        self.waha = WahaClient(config.get("whatsapp.apiUrl"), config.get("whatsapp.apiKey"))
        if config.get("signal.rpcUrl"):
            self.signal = SignalRpcClient(config.get("signal.rpcUrl"), config.get("signal.number"))
        else:
            self.signal = SignalRestClient(config.get("signal.apiUrl"), config.get("signal.number"))

    def check(self, name, fn):
        """Run *fn*; print its line; return True when it passed."""
        try:
            detail = fn()
        except CheckFailed as e:
            self.failed += 1
            print("FAIL  %s: %s; fix: %s" % (name, e.cause, e.fix), file=self.out)
            return False
        except SetupError as e:
            self.failed += 1
            cause, _, fix = str(e).partition("; ")
            print("FAIL  %s: %s; fix: %s" % (name, cause, fix or "see the cause"), file=self.out)
            return False
        print("ok    %s: %s" % (name, detail), file=self.out)
        return True

    def run(self):
        c = self.config
        self.check("config", lambda: "%s is valid (%d channel%s, %s)" % (
            self.config_path, len(c.channels), "" if len(c.channels) == 1 else "s", self.signal.kind))
        self.check("files", self.check_files)
        self.check("database", self.check_database)
        if self.check("waha", self.check_waha):
            for ch in c.channels:
                if self.check("waha session %s" % ch.session, lambda: self.check_session(ch.session)):
                    self.check("webhook %s" % ch.session, lambda: self.check_webhook(ch.session))
        self.check("self-test webhook", self.check_self_webhook)
        if self.check("signal-cli", self.check_signal):
            self.check("signal number", self.check_number)
            for ch in c.channels:
                self.check("owner identity %s" % mask_phone(ch.destination), lambda: self.check_identity(ch.destination))
            if self.send_test:
                for ch in c.channels:
                    self.check("send test %s" % mask_phone(ch.destination), lambda: self.check_send(ch.destination))
        print("%s" % ("all checks passed" if not self.failed else "%d check%s failed" % (
            self.failed, "" if self.failed == 1 else "s")), file=self.out)
        return 0 if not self.failed else 1

    # -- local ---------------------------------------------------------------
    def check_files(self):
        paths = [self.config_path, env_file_for(self.config_path)]
        db = self.config.get("database.path")
        paths += [db, db + "-wal", db + "-shm"]
        loose = readable_by_others(paths)
        if loose:
            raise CheckFailed("readable by other users: %s" % ", ".join(loose),
                              "chmod 600 %s" % " ".join(shlex.quote(p) for p in loose))
        return "config, .env and database are private (no group or other access)"

    def check_database(self):
        try:
            store = Store(self.config.get("database.path"), self.config.get("database.synchronous"))
        except (sqlite3.Error, OSError) as e:
            raise CheckFailed("%s cannot be opened (%s)" % (self.config.get("database.path"), scrub(e, 80)),
                              "check database.path and that the directory is writable by this user")
        try:
            store.unlock(self.config.encryption_secret, enabled=self.config.encryption)
            pending = store.queue_depth("w2s") + store.queue_depth("s2w")
            self.last_event = {row[0]: row[1] for row in store.db.execute(
                "SELECT channel, MAX(created_at) FROM queue WHERE direction = 'w2s' GROUP BY channel")}
        except CryptoError as e:
            cause, _, fix = str(e).partition("; ")
            raise CheckFailed(cause, fix or "use the secret the database was created with")
        finally:
            store.close()
        return "%s opens with WHATSIGNAL_ENCRYPTION_SECRET (%s; %d item%s queued)" % (
            self.config.get("database.path"), "encrypted" if self.config.encryption else "NOT encrypted",
            pending, "" if pending == 1 else "s")

    # -- WAHA ----------------------------------------------------------------
    def check_waha(self):
        status, _ = _waha_get(self.waha, "/ping")
        if status != 200:
            raise CheckFailed("WAHA at %s answered %d to /ping" % (self.waha.base, status),
                              "check that whatsapp.apiUrl points to WAHA itself")
        status, body = _waha_get(self.waha, "/api/server/version")
        if status == 401:
            raise CheckFailed("WAHA refused the API key (401)", _waha_key_fix())
        body = body if isinstance(body, dict) else {}
        return "WAHA %s (%s, %s) at %s, API key accepted" % (body.get("version", "?"), body.get("engine", "?"),
                                                             body.get("tier", "?"), self.waha.base)

    def check_session(self, session):
        info = waha_session(self.waha, session)
        status = info.get("status")
        if status != "WORKING":
            fix = SESSION_FIXES.get(status, "see docker compose logs waha") % {"waha": self.waha.base, "s": session}
            raise CheckFailed("session %s is %s, not WORKING" % (session, status), fix)
        me = info.get("me") if isinstance(info.get("me"), dict) else {}
        return "session %s is WORKING as %s" % (session, mask_phone(jid_to_phone(me.get("id")) or me.get("id") or "?"))

    def check_webhook(self, session):
        if not self.config.get("server.publicUrl") and self.config.get("server.host") in ("0.0.0.0", "::", ""):
            raise CheckFailed("server.host is %s and server.publicUrl is not set, so the URL WAHA must post to is "
                              "unknown" % self.config.get("server.host"),
                              "set server.publicUrl to it, e.g. http://whatsignal:%d%s in the compose stack"
                              % (self.config.get("server.port"), WEBHOOK_PATH))
        url = webhook_url(self.config)
        info = waha_session(self.waha, session)
        problems = webhook_problems(info.get("config"), desired_webhook(self.config, url))
        if problems:
            raise CheckFailed("; ".join(p for p, _ in problems), problems[0][1])
        at = self.last_event.get(session)
        seen = ("last event from WAHA stored %s ago" % _ago(time.time() - at) if at else
                "no event from WAHA stored yet (one comes when the session restarts or a message arrives)")
        return "posts to %s with the %d events, the HMAC key and retries; %s" % (url, len(WAHA_EVENTS), seen)

    # -- the bridge itself ---------------------------------------------------
    def check_self_webhook(self):
        host = self.config.get("server.host")
        url = webhook_url(self.config, "127.0.0.1" if host in ("0.0.0.0", "", "::") else host)   # the bridge itself
        event = {"id": "evt_doctor_" + secrets.token_hex(8), "timestamp": int(time.time() * 1000),
                 "event": "engine.event", "session": self.config.channels[0].session, "payload": {}}
        try:
            status, body = post_webhook(url, event, self.config.get("whatsapp.webhookSecret"))
        except OSError as e:
            raise CheckFailed("nothing answers at %s (%s)" % (url, e.__class__.__name__),
                              "start the bridge (docker compose up -d whatsignal, or python3 whatsignal.py), "
                              "and check server.host/server.port (PORT)")
        if status == 401:
            raise CheckFailed("the bridge at %s refused a webhook signed with this WEBHOOK_SECRET (401)" % url,
                              "the running bridge has another secret: restart it after changing .env "
                              "(docker compose up -d whatsignal)")
        if status != 200:
            raise CheckFailed("the bridge at %s answered %d to a signed test webhook" % (url, status),
                              "see its log (docker compose logs whatsignal)")
        return "the bridge at %s accepted a webhook signed with WEBHOOK_SECRET" % url

    # -- Signal --------------------------------------------------------------
    def _rpc(self, method, params):
        """(HTTP status, JSON-RPC message) of one call to signal-cli's JSON-RPC endpoint, for the bridge's account
        (a daemon started without -a serves several and answers per-account methods only with it, as SignalRpcClient)."""
        req = json.dumps({"jsonrpc": "2.0", "method": method, "params": dict(params, account=self.signal.number),
                          "id": 1}).encode()
        resp = self.signal.http.request("POST", self.signal.base + "/api/v1/rpc", {"Content-Type": "application/json"},
                                        req, timeout=10)
        return resp.status, _json_body(resp)

    def _rest(self, path):
        resp = self.signal.http.request("GET", self.signal.base + path, timeout=10)
        return resp.status, _json_body(resp)

    def check_signal(self):
        base = self.signal.base
        try:
            self.signal.check()
            if isinstance(self.signal, SignalRestClient):
                status, about = self._rest("/v1/about")
                about = about if isinstance(about, dict) else {}
                return "signal-cli-rest-api %s (mode %s) at %s" % (about.get("version", "?"), about.get("mode", "?"), base)
            status, msg = self._rpc("version", {})
        except TransientError as e:
            raise CheckFailed("cannot reach signal-cli at %s (%s)" % (base, scrub(e, 80)),
                              "start it (docker compose up -d signal-cli) or correct signal.rpcUrl / signal.apiUrl")
        if status == 421:
            host = urllib.parse.urlsplit(base).netloc
            raise CheckFailed("signal-cli answered 421 to its JSON-RPC endpoint: it is bound to one address and "
                              "refuses the Host header %s" % host,
                              "start the daemon with --http 0.0.0.0:%s (the compose file does), or set "
                              "signal.rpcUrl to the exact address and port it is bound to"
                              % (urllib.parse.urlsplit(base).port or 8080))
        if status != 200 or not isinstance(msg, dict) or "result" not in msg:
            raise CheckFailed("signal-cli's JSON-RPC endpoint answered HTTP %d" % status,
                              "check that signal.rpcUrl is signal-cli's `daemon --http` address")
        version = (msg.get("result") or {}).get("version", "?") if isinstance(msg.get("result"), dict) else "?"
        return "signal-cli %s at %s (JSON-RPC endpoint answers)" % (version, base)

    def check_number(self):
        number = self.config.get("signal.number")
        shown = mask_phone(number)
        if isinstance(self.signal, SignalRestClient):
            status, accounts = self._rest("/v1/accounts")
            registered = isinstance(accounts, list) and number in accounts
            fix = ("register or link it in signal-cli-rest-api: open %s/v1/qrcodelink?device_name=whatsignal and "
                   "scan it in Signal > Settings > Linked devices" % self.signal.base)
        else:
            status, msg = self._rpc("listAccounts", {})
            result = msg.get("result") if isinstance(msg, dict) else None
            if isinstance(result, list):      # multi-account daemon: the accounts it serves
                registered = any(isinstance(a, dict) and a.get("number") == number for a in result)
            else:                             # single-account daemon (-a): ask Signal about the number
                status, msg = self._rpc("getUserStatus", {"recipient": [number]})
                result = msg.get("result") if isinstance(msg, dict) else None
                registered = isinstance(result, list) and any(
                    isinstance(r, dict) and r.get("isRegistered") for r in result)
            fix = ("link signal-cli to it (docker compose run --rm signal-cli link -n WhatSignal, scan the printed "
                   "sgnl:// link as a QR code in Signal > Settings > Linked devices) or register it (signal-cli -a %s "
                   "register, then verify CODE), then restart the daemon" % number)
        if not registered:
            raise CheckFailed("the bridge's number %s is not registered with signal-cli" % shown, fix)
        return "the bridge's number %s is registered" % shown

    def check_identity(self, owner):
        number = self.config.get("signal.number")
        if isinstance(self.signal, SignalRestClient):
            status, ids = self._rest("/v1/identities/%s" % urllib.parse.quote(number, safe=""))
            if status != 200 or not isinstance(ids, list):
                raise CheckFailed("signal-cli-rest-api answered %d to GET /v1/identities" % status,
                                  "check that signal.apiUrl is signal-cli-rest-api and the number is registered there")
            entries = [i for i in ids or [] if isinstance(i, dict) and i.get("number") == owner]
            levels = [i.get("status") for i in entries]
            fix = ("check the safety number with the owner, then: curl -X PUT -H 'Content-Type: application/json' "
                   "-d '{\"trust_all_known_keys\": true}' %s/v1/identities/%s/trust/%s" % (self.signal.base, number, owner))
        else:
            status, msg = self._rpc("listIdentities", {"number": owner})
            result = msg.get("result") if isinstance(msg, dict) else None
            entries = [i for i in result or [] if isinstance(i, dict)]
            levels = [i.get("trustLevel") for i in entries]
            fix = ("check the safety number with the owner, then: signal-cli -a %s trust -a %s "
                   "(docker compose exec signal-cli signal-cli -a %s trust -a %s), or set signal.trustNewIdentity"
                   % (number, owner, number, owner))
        if "UNTRUSTED" in levels:
            raise CheckFailed("the owner's identity key (%s) is UNTRUSTED: the owner's safety number changed and "
                              "nothing is sent to them" % mask_phone(owner), fix)
        if not entries:
            return "no identity key of %s known yet (trusted on first contact)" % mask_phone(owner)
        return "the owner's identity key is trusted (%s)" % ", ".join(sorted(set(str(l) for l in levels)))

    def check_send(self, owner):
        try:
            self.signal.send(owner, "WhatSignal doctor: the bridge can reach you on Signal (%s)" % iso_now())
        except UpstreamError as e:
            raise CheckFailed("the test message to %s was not sent (%s)" % (mask_phone(owner), scrub(e, 120)),
                              "fix the failed checks above; then see the signal-cli log")
        return "a test message went to %s; look at your Signal" % mask_phone(owner)


def _ago(seconds):
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return "%d %s" % (seconds // size, unit)
    return "%d s" % seconds


# -- init --------------------------------------------------------------------

INIT_DEFAULTS = {   # flag -> (local default, compose default, question)
    "waha_url": ("http://localhost:3000", "http://waha:3000", "WAHA URL"),
    "waha_api_key": (None, None, "WAHA API key (empty: generate one for a new WAHA)"),
    "session": ("default", "default", "WAHA session"),
    "signal_rpc_url": ("http://localhost:8080", "http://signal-cli:8080", "signal-cli daemon URL"),
    "number": (None, None, "the bridge's Signal number (E.164, e.g. +15550000001)"),
    "owner": (None, None, "your own Signal number, the owner (E.164)"),
    "host": ("127.0.0.1", "0.0.0.0", "address the bridge listens on"),
    "port": ("8082", "8082", "port the bridge listens on"),
    "public_url": (None, "http://whatsignal:8082" + WEBHOOK_PATH, "URL WAHA posts webhooks to"),
    "db": ("./whatsignal.db", "/app/data/whatsignal.db", "database file"),
    "cache_dir": ("./cache", "/app/cache", "media cache directory"),
}


def _validate_answer(key, value):
    """Return a problem for one answer, or None."""
    if key in ("waha_url", "signal_rpc_url", "signal_rest_url", "public_url") and value:
        u = urllib.parse.urlsplit(value)
        if u.scheme not in ("http", "https") or not u.hostname:
            return "%r is not an http(s) URL; write it like http://localhost:3000" % value
    if key in ("number", "owner"):
        if not value:
            return "needed; write it like +15550000001"
        if not E164.match(value):
            return "%s is not an E.164 number; write it like +15550000001 (+, country code, number)" % mask_phone(value)
    if key == "port" and not (str(value).isdigit() and 0 < int(value) < 65536):
        return "%r is not a port number (1-65535)" % value
    return None


def _probe_waha(url, key, session):
    """What init can learn from WAHA now: one line."""
    waha = WahaClient(url, key or None, HttpTransport(timeout=3))
    try:
        status, ver = _waha_get(waha, "/api/server/version")
        if status == 401:
            return "WAHA at %s is up but refused the API key (401)" % url
        info = waha_session(waha, session)
        return "WAHA %s at %s: session %s is %s" % ((ver or {}).get("version", "?") if isinstance(ver, dict) else "?",
                                                   url, session, info.get("status"))
    except SetupError as e:
        return "WAHA: %s" % str(e).split("; ")[0]


def _probe_signal(rpc_url, rest_url, number):
    try:
        if rest_url:
            client = SignalRestClient(rest_url, number, HttpTransport(timeout=3))
            about = client.call("GET", "/v1/about") or {}
            accounts = client.call("GET", "/v1/accounts") or []
            return "signal-cli-rest-api %s at %s: %s is %s" % (about.get("version", "?"), rest_url, mask_phone(number),
                                                               "registered" if number in accounts else "NOT registered")
        client = SignalRpcClient(rpc_url, number, HttpTransport(timeout=3))
        version = (client.call("version", {}) or {}).get("version", "?")
        try:
            accounts = client.call("listAccounts", {})
            registered = any(a.get("number") == number for a in accounts if isinstance(a, dict))
        except UpstreamError:
            status = client.call("getUserStatus", {"recipient": [number]}) or []
            registered = any(isinstance(r, dict) and r.get("isRegistered") for r in status)
        return "signal-cli %s at %s: %s is %s" % (version, rpc_url, mask_phone(number),
                                                  "registered" if registered else "NOT registered")
    except UpstreamError as e:
        return "signal-cli at %s: not reachable now (%s)" % (rpc_url or rest_url, scrub(e, 60))


def _ask(question, default, validate, stdin, out):
    while True:
        print("%s%s: " % (question, " [%s]" % default if default else ""), end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            raise SetupError("no answer (end of input); pass the value as a flag or use --yes")
        answer = line.strip() or (default or "")
        problem = validate(answer)
        if not problem:
            return answer
        print("  %s" % problem, file=out)


def init_answers(args, interactive, stdin, out):
    """Every init value: flag, else the answer to the question, else the default; validated."""
    compose = args.compose
    answers, problems = {}, []
    for key, (local, comp, question) in INIT_DEFAULTS.items():
        if key == "signal_rpc_url" and args.signal_rest_url:
            answers["signal_rest_url"] = args.signal_rest_url
            continue
        given = getattr(args, key)
        default = comp if compose else local
        if given is not None:
            value = str(given)
        elif interactive:
            value = _ask(question, default, lambda a, k=key: _validate_answer(k, a), stdin, out)
        else:
            value = default or ""
        problem = _validate_answer(key, value)
        if problem:
            problems.append("--%s: %s" % (key.replace("_", "-"), problem))
        answers[key] = value
        if interactive and key == "waha_api_key" and not value:
            print("  a new key will be generated; give WAHA the same one (WAHA_API_KEY in .env)", file=out)
        if interactive and key == "session" and not problems:
            print("  " + _probe_waha(answers["waha_url"], answers["waha_api_key"], value), file=out)
        if interactive and key == "number" and not problems:
            print("  " + _probe_signal(answers.get("signal_rpc_url"), answers.get("signal_rest_url"), value), file=out)
    if answers.get("number") and answers.get("number") == answers.get("owner"):
        problems.append("--owner: the owner cannot be the bridge's own number; use your personal Signal number")
    if problems:
        raise ConfigError(problems)
    return answers


def init_files(answers, config_path, force=False, compose=False, rand=secrets.token_urlsafe):
    """Write config.json and .env (mode 0600) from *answers*; return (config dict, env dict)."""
    env_path = env_file_for(config_path)
    existing = [p for p in (config_path, env_path) if os.path.exists(p)]
    if existing and not force:
        raise SetupError("%s already exist%s; nothing written (pass --force to replace, after a backup: "
                         "losing WHATSIGNAL_ENCRYPTION_SECRET makes the database unreadable)"
                         % (" and ".join(existing), "s" if len(existing) == 1 else ""))
    raw = {"server": {"host": answers["host"], "port": int(answers["port"])},
           "whatsapp": {"apiUrl": answers["waha_url"], "apiKey": "env:WAHA_API_KEY", "session": answers["session"],
                        "webhookSecret": "env:WEBHOOK_SECRET"},
           "signal": {"number": answers["number"], "destination": answers["owner"]},
           "database": {"path": answers["db"]}, "media": {"cacheDir": answers["cache_dir"]}}
    if answers.get("public_url"):
        raw["server"]["publicUrl"] = answers["public_url"]
    if answers.get("signal_rest_url"):
        raw["signal"]["apiUrl"] = answers["signal_rest_url"]
    else:
        raw["signal"]["rpcUrl"] = answers["signal_rpc_url"]
    env = {"WEBHOOK_SECRET": rand(32), "WAHA_API_KEY": answers["waha_api_key"] or rand(32),
           "WHATSIGNAL_ENABLE_ENCRYPTION": "true", "WHATSIGNAL_ENCRYPTION_SECRET": rand(32)}
    if compose:   # docker-compose.yml runs the bridge as this user, on ./data and ./cache beside the config
        env.update(WHATSIGNAL_UID=str(os.getuid()), WHATSIGNAL_GID=str(os.getgid()))
        for d in ("data", "cache"):
            os.makedirs(os.path.join(os.path.dirname(os.path.abspath(config_path)), d), mode=0o700, exist_ok=True)
    lines = ["# Written by `whatsignal.py init` on %s. Keep it private (mode 0600) and back it up:" % iso_now(),
             "# without WHATSIGNAL_ENCRYPTION_SECRET the database cannot be read."]
    lines += ["%s=%s" % (k, v) for k, v in env.items()]
    _write_private(env_path, "\n".join(lines) + "\n")
    _write_private(config_path, json.dumps(raw, indent=2) + "\n")
    return raw, env


def _write_private(path, text):
    """Write *text* to *path* with mode 0600 from the first byte (replacing what is there)."""
    tmp = path + ".tmp-%d" % os.getpid()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


###############################################################################
# Command line ################################################################
###############################################################################

COMMANDS = (
    ("serve", "run the bridge (the default command)"),
    ("init", "ask for (or take flags for) the set-up, write config.json and .env with new secrets"),
    ("webhook", "`webhook install` points the WAHA session's webhook here; `webhook show` compares it"),
    ("doctor", "check every link of the set-up, one line each with the fix (--send-test: message the owner)"),
    ("check-config", "validate the configuration and print it with secrets masked"),
    ("outbox", "list undeliverable items; `outbox retry ID|all` queues them again"),
    ("cleanup", "one retention sweep now (--vacuum to compact); safe while serving"),
    ("backup", "online, verified copy of the database: backup DEST [--with-config]"),
    ("verify", "integrity, schema and key check of the database (or of DB)"),
    ("restore", "replace the database with a verified backup (service stopped)"),
    ("rotate-key", "re-encrypt from WHATSIGNAL_ENCRYPTION_SECRET_OLD to WHATSIGNAL_ENCRYPTION_SECRET"),
    ("stats", "counts, queue depth, sizes; nothing decrypted"),
    ("demo", "see WhatSignal work against built-in simulators, no setup (--keep to stay up)"),
    ("bench", "measure throughput, latency and memory on this machine"),
)


def build_parser():
    p = argparse.ArgumentParser(
        prog="whatsignal.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="WhatSignal %s: read and answer your WhatsApp chats from Signal." % __version__,
        epilog="commands:\n" + "\n".join("  %-13s %s" % c for c in COMMANDS) +
               "\n\nexamples:\n  python whatsignal.py demo\n  python whatsignal.py --config config.json check-config\n"
               "  python whatsignal.py --config config.json")
    p.add_argument("--config", help="JSON config file (default: $WHATSIGNAL_CONFIG)")
    p.add_argument("--version", action="version", version="WhatSignal " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS:
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--config", default=argparse.SUPPRESS, help="JSON config file")
        if name == "outbox":
            sp.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
            sp.add_argument("target", nargs="?", help="item id or 'all'")
        elif name == "cleanup":
            sp.add_argument("--vacuum", action="store_true", help="compact the database file (VACUUM)")
        elif name == "backup":
            sp.add_argument("dest", help="backup file or directory")
            sp.add_argument("--with-config", action="store_true", help="also write the config, secrets masked")
        elif name == "verify":
            sp.add_argument("db", nargs="?", help="database file (default: database.path)")
        elif name == "restore":
            sp.add_argument("src", help="backup file to restore")
        elif name == "demo":
            sp.add_argument("--keep", action="store_true", help="leave the demo running and print its URLs")
        elif name == "init":
            for flag, text in (("--waha-url", "WAHA base URL"), ("--waha-api-key", "WAHA API key (default: generate)"),
                               ("--session", "WAHA session"), ("--signal-rpc-url", "signal-cli daemon --http URL"),
                               ("--signal-rest-url", "signal-cli-rest-api URL (instead of --signal-rpc-url)"),
                               ("--number", "the bridge's Signal number, E.164"),
                               ("--owner", "the owner's Signal number, E.164"), ("--host", "listen address"),
                               ("--port", "listen port"), ("--public-url", "URL WAHA posts webhooks to"),
                               ("--db", "database file"), ("--cache-dir", "media cache directory")):
                sp.add_argument(flag, help=text)
            sp.add_argument("--compose", action="store_true",
                            help="defaults for the docker-compose.yml stack (waha, signal-cli, /app/data)")
            sp.add_argument("--yes", "-y", action="store_true", help="ask nothing: flags, else the defaults")
            sp.add_argument("--force", action="store_true", help="replace an existing config.json and .env")
        elif name == "webhook":
            sp.add_argument("action", choices=["install", "show"])
            sp.add_argument("--url", help="webhook URL (default: server.publicUrl, else from server.host and port)")
            sp.add_argument("--public-host", help="host name WAHA reaches the bridge by (with server.port)")
            sp.add_argument("--session", help="WAHA session (default: every configured one)")
            sp.add_argument("--yes", "-y", action="store_true", help="do not ask before WAHA restarts the session")
        elif name == "doctor":
            sp.add_argument("--send-test", action="store_true", help="also send the owner a test message on Signal")
        elif name == "bench":
            sp.add_argument("--quick", action="store_true", help="smaller loads (a smoke run)")
            sp.add_argument("--tiny", action="store_true",
                            help="a run of seconds that only proves every figure is produced (the tests use it)")
            sp.add_argument("--growth-rows", type=int, default=1000000, help="rows for the growth test")
            sp.add_argument("--profile", metavar="DIR", help="profile the bridge (cProfile, all threads) into DIR")
    return p


def _print(obj):
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _config_path(args, environ):
    return args.config or environ.get("WHATSIGNAL_CONFIG") or "config.json"


def _load(args, environ):
    path = _config_path(args, environ)
    return load_config(path, with_env_file(path, environ))


def _open_store(config):
    store = Store(config.get("database.path"), config.get("database.synchronous"))
    try:
        store.unlock(config.encryption_secret, enabled=config.encryption)
    except CryptoError:
        store.close()
        raise
    return store


def main(argv=None, environ=None, stdout=None):
    """Run the command line; return the exit code (0 ok, 1 failed check, 2 user error)."""
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        if command == "demo":
            return run_demo(keep=args.keep)
        if command == "bench":
            return run_bench(quick=args.quick, growth_rows=args.growth_rows, profile=args.profile, tiny=args.tiny)
        if command == "init":
            return cmd_init(args, environ)
        if command == "doctor":
            return cmd_doctor(args, environ)
        config = _load(args, environ)
        return globals()["cmd_" + command.replace("-", "_")](args, config, environ)
    except ConfigError as e:
        for line in e.problems:
            print("config error: " + line, file=sys.stderr)
        return 2
    except (WhatSignalError, sqlite3.DatabaseError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2


def cmd_init(args, environ):
    path = _config_path(args, environ)
    answers = init_answers(args, not args.yes, sys.stdin, sys.stdout)
    raw, env = init_files(answers, path, force=args.force, compose=args.compose)
    env_path = env_file_for(path)
    print("wrote %s and %s (mode 0600); back up .env: its WHATSIGNAL_ENCRYPTION_SECRET opens the database"
          % (path, env_path))
    if args.compose:     # the service names resolve only inside the stack, which is not up yet
        print("WAHA and signal-cli: doctor checks them once the stack runs")
    else:
        print(_probe_waha(answers["waha_url"], env["WAHA_API_KEY"], answers["session"]))
        print(_probe_signal(answers.get("signal_rpc_url"), answers.get("signal_rest_url"), answers["number"]))
    run = "docker compose exec whatsignal python /app/whatsignal.py" if args.compose else \
        "python3 whatsignal.py --config %s" % shlex.quote(path)
    print("next steps:")
    print("  1. start the stack: docker compose up -d" if args.compose else
          "  1. start WAHA (WAHA_API_KEY from .env) and signal-cli, then the bridge: %s" % run)
    print("  2. link the accounts (README, Set-up): scan WAHA's QR code for WhatsApp; link or register %s in "
          "signal-cli" % mask_phone(answers["number"]))
    print("  3. point WAHA's webhook here: %s webhook install" % run)
    print("  4. check everything: %s doctor" % run)
    return 0


def cmd_webhook(args, config, environ):
    waha = WahaClient(config.get("whatsapp.apiUrl"), config.get("whatsapp.apiKey"))
    url = args.url or webhook_url(config, args.public_host)
    problems = []
    _check_url("--url", url, problems)
    if problems:
        raise ConfigError(problems)
    sessions = [args.session] if args.session else [c.session for c in config.channels]
    if args.action == "show":
        return 1 if sum(webhook_show(config, waha, s, url, sys.stdout) for s in sessions) else 0
    confirm = None
    if not args.yes and sys.stdin.isatty():
        def confirm():
            print("continue? [y/N] ", end="", file=sys.stderr, flush=True)
            return sys.stdin.readline().strip().lower() in ("y", "yes")
    for s in sessions:
        webhook_install(config, waha, s, url, sys.stdout, sys.stderr, confirm)
    return 0


def cmd_doctor(args, environ):
    path = _config_path(args, environ)
    try:
        config = load_config(path, with_env_file(path, environ))
    except ConfigError as e:
        for line in e.problems:
            cause, _, fix = line.rpartition("; ")
            print("FAIL  config: %s; fix: %s" % (cause or line, fix if cause else "see the cause"))
        print("the other checks need a valid config; fix it and run doctor again")
        return 1
    return Doctor(config, path, environ, sys.stdout, send_test=args.send_test).run()


def cmd_check_config(args, config, environ):
    _print(config.masked())
    print("configuration OK", file=sys.stderr)
    return 0


def pin_mmap_threshold():
    """Keep glibc's mmap threshold at its default (128 KiB) for the life of the process (glibc only).

    glibc raises the threshold to the size of any mmap'ed block freed, up to 32 MiB: after the
    16 MiB the key derivation takes, buffers up to 16 MiB (webhook bodies, media chunks) would come
    from the heap and stay there after use (measured: 24 MB of 600 KB buffers freed, RSS kept them
    all).  Set explicitly, the threshold no longer moves.
    """
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD


def release_memory():
    """Hand memory freed after start-up (compiling this file, key derivation) back to the OS (glibc only)."""
    import gc
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cmd_serve(args, config, environ):
    log = Log(config.get("logLevel"))
    profiler = ThreadProfiler(environ["WHATSIGNAL_PROFILE"]) if environ.get("WHATSIGNAL_PROFILE") else None
    if profiler:
        profiler.install()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):   # before serving: a SIGTERM right after start is a clean stop too
        signal.signal(sig, lambda *_: stop.set())
    pin_mmap_threshold()
    release_memory()     # compiling this file left ~10 MB freed but held: return it before the key derivation
    app = App(config, log).start()
    release_memory()
    while not stop.wait(1.0):
        pass
    app.stop()
    if profiler:
        profiler.dump()
    return 0


def cmd_outbox(args, config, environ):
    store = _open_store(config)
    try:
        if args.action == "retry":
            if not args.target or not (args.target == "all" or args.target.isdigit()):
                raise WhatSignalError("outbox retry needs an item id or 'all'")
            _print(outbox(store, time.time(), retry=args.target))
        else:
            _print(outbox(store, time.time()))
    finally:
        store.close()
    return 0


def cmd_cleanup(args, config, environ):
    store = _open_store(config)
    try:
        start = time.monotonic()
        counts = cleanup(store, config, time.time(), vacuum=args.vacuum, pause=0.001)
        store.set_meta("last_cleanup", json.dumps({"at": time.time(), "removed": counts,
                                                    "seconds": round(time.monotonic() - start, 3)}))
        _print({"removed": counts, "seconds": round(time.monotonic() - start, 3)})
    finally:
        store.close()
    return 0


def cmd_backup(args, config, environ):
    _print(backup(config.get("database.path"), args.dest, config if args.with_config else None))
    return 0


def cmd_verify(args, config, environ):
    ok, report = verify(args.db or config.get("database.path"), config)
    report["verdict"] = "OK" if ok else "FAILED"
    _print(report)
    return 0 if ok else 1


def cmd_restore(args, config, environ):
    _print(restore(config.get("database.path"), args.src, config))
    return 0


def cmd_rotate_key(args, config, environ):
    if not config.old_secret:
        raise WhatSignalError("set WHATSIGNAL_ENCRYPTION_SECRET_OLD to the current secret and "
                              "WHATSIGNAL_ENCRYPTION_SECRET to the new one")
    if not config.encryption:
        raise WhatSignalError("rotate-key needs encryption enabled (WHATSIGNAL_ENABLE_ENCRYPTION)")
    store = Store(config.get("database.path"), config.get("database.synchronous"))
    try:
        if store.serving(time.time()) or store.lease_holder(time.time()):
            raise WhatSignalError("WhatSignal is running on this database; stop it (and every other instance) before rotating the key")
        progress = lambda table, n: print("rotated %s: %d rows" % (table, n), file=sys.stderr)
        totals = rotate_key(store, config.old_secret, config.encryption_secret, progress=progress,
                            cache_dir=config.get("media.cacheDir"))
        _print({"rotated": totals, "key_check": "updated"})
    finally:
        store.close()
    return 0


def cmd_stats(args, config, environ):
    store = _open_store(config)
    try:
        _print(stats(store, config, time.time()))
    finally:
        store.close()
    return 0


def _demo_setup(tmp, log_level="error", stream=None):
    """Simulators plus a bridge on a temporary database: (app, waha, signal, secret)."""
    waha, sig = WahaSim(), SignalSim(keepalive=2.0)
    secret = secrets.token_urlsafe(32)
    raw = {"server": {"host": "127.0.0.1", "port": 0},
           "whatsapp": {"apiUrl": waha.url, "apiKey": waha.api_key, "webhookSecret": secret},
           "signal": {"rpcUrl": sig.url, "number": "+15550000001", "destination": "+15550000002"},
           "database": {"path": os.path.join(tmp, "demo.db")}, "media": {"cacheDir": os.path.join(tmp, "cache")}}
    config = validate_config(raw, {"WHATSIGNAL_ENCRYPTION_SECRET": secrets.token_urlsafe(32)})
    app = App(config, Log(log_level, stream=stream)).start()
    return app, waha, sig, secret


DEMO_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)) * 8 + b"\xff\xd9"


def run_demo(keep=False, out=None):
    """Play a short conversation through simulated WAHA and signal-cli; print each hop."""
    import tempfile   # demo and bench only: kept out of the serving process's memory
    out = out or sys.stdout
    say = lambda side, text: print("%-10s %s" % (side, text), file=out, flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="whatsignal-demo-") as tmp:
        app, waha, sig, secret = _demo_setup(tmp)
        try:
            alice = "4915111111189@c.us"
            waha.names[alice] = "Alice Example"
            hook = app.url + "/webhook/whatsapp"
            say("", "WhatSignal demo: simulated WAHA %s, simulated signal-cli %s, bridge %s" % (waha.url, sig.url, app.url))
            print("", file=out)
            step = lambda n: sig.wait(lambda calls: len([c for c in calls if c["method"] in ("send", "sendReaction")]) >= n, 5)

            say("WhatsApp", "Alice Example (+4915111111189) writes: \"Are we still on for dinner tonight?\"")
            status, _ = post_webhook(hook, waha_message(alice, "Are we still on for dinner tonight?", msg_id="3EB0DEMO0001"), secret)
            say("bridge", "signed webhook verified, stored encrypted, answered %d; delivering to Signal" % status)
            if not step(1):
                raise WhatSignalError("the demo message did not reach the simulated Signal")
            first = sig.sends()[-1]
            say("Signal", "owner sees: %r" % first["params"]["message"])
            print("", file=out)

            waha.files["/api/files/default/3EB0DEMO0002.jpeg"] = ("image/jpeg", DEMO_JPEG)
            media = {"url": waha.url + "/api/files/default/3EB0DEMO0002.jpeg", "mimetype": "image/jpeg", "filename": None}
            say("WhatsApp", "Alice sends a photo with the caption \"The place I booked\"")
            post_webhook(hook, waha_message(alice, "The place I booked", msg_id="3EB0DEMO0002", media=media), secret)
            if not step(2):
                raise WhatSignalError("the demo photo did not reach the simulated Signal")
            photo = sig.sends()[-1]
            att = photo["params"].get("attachments") or []
            say("bridge", "photo fetched from WAHA with X-Api-Key (%d bytes, type checked), sent as attachment"
                % len(DEMO_JPEG))
            say("Signal", "owner sees: %d photo + %r" % (len(att), photo["params"]["message"]))
            print("", file=out)

            now_ms = int(time.time() * 1000)
            say("Signal", "owner quotes Alice's first message and answers \"Yes! 8 pm, see you there\"")
            sig.push(owner_envelope("+15550000002", now_ms, "Yes! 8 pm, see you there",
                                    quote=(first["timestamp"], "+15550000001", first["params"]["message"])))
            if not waha.wait(lambda calls: len(calls) >= 1, 5):
                raise WhatSignalError("the demo reply did not reach the simulated WAHA")
            reply = waha.calls[-1]
            say("WhatsApp", "Alice's chat %s receives %r as a reply to %s" % (
                reply["json"]["chatId"], reply["json"]["text"], reply["json"].get("reply_to")))
            print("", file=out)

            say("Signal", "owner reacts 👍 to the photo")
            sig.push(owner_envelope("+15550000002", now_ms + 1, reaction=("👍", "+15550000001", photo["timestamp"])))
            if not waha.wait(lambda calls: len(calls) >= 2, 5):
                raise WhatSignalError("the demo reaction did not reach the simulated WAHA")
            r = waha.calls[-1]
            say("WhatsApp", "%s %s with %s on %s" % (r["method"], r["path"], r["json"].get("reaction"), r["json"].get("messageId")))
            print("", file=out)

            say("Signal", "owner sends /chats")
            sig.push(owner_envelope("+15550000002", now_ms + 2, "/chats"))
            if not step(3):
                raise WhatSignalError("the demo /chats answer did not arrive")
            say("Signal", "bridge answers: %r" % sig.sends()[-1]["params"]["message"])
            print("", file=out)
            say("", "stranger +15550009999 writes to the bridge's Signal number: ignored (only the owner speaks through it)")
            sig.push(owner_envelope("+15550009999", now_ms + 3, "let me in", uuid="stranger-uuid"))
            time.sleep(0.2)
            say("", "WAHA calls: %d, Signal sends: %d, unauthorized senders: %d"
                % (len(waha.calls), len(sig.sends()), app.metrics.get("whatsignal_unauthorized_senders_total")))
            if keep:
                print("\nThe demo keeps running (Ctrl-C to stop):\n  bridge  %s  (webhook secret %s)\n"
                      "  WAHA simulator %s (X-Api-Key %s)\n  signal-cli simulator %s\n"
                      "  try: curl %s/health" % (app.url, secret, waha.url, waha.api_key, sig.url, app.url), file=out)
                stop = threading.Event()
                for s_ in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s_, lambda *_: stop.set())
                while not stop.wait(1.0):
                    pass
        finally:
            app.stop()
            waha.close()
            sig.close()
    say("", "demo finished in %.1f s" % (time.monotonic() - started))
    return 0


###############################################################################
# Benchmark ###################################################################
###############################################################################
# `bench` runs the bridge as its own process against the simulators (in this
# process) and drives it with load-generator processes, so neither the
# simulators nor the load are counted in the bridge's memory or CPU.


def _pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _load_worker(url, secret, seconds, count, threads, tag, out):
    """Load-generator process: *threads* keep-alive connections posting signed webhooks."""
    lat, errors, sent = [], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds if seconds else None
    per_thread = [count // threads + (1 if t < count % threads else 0) for t in range(threads)] if count else None
    u = urllib.parse.urlsplit(url)

    def run(t):
        conn = http.client.HTTPConnection(u.netloc, timeout=30)
        mine = []
        i = 0
        chat = "49151%08d@c.us" % (hash((tag, t)) % 10 ** 8)
        while (deadline is None or time.monotonic() < deadline) and (per_thread is None or i < per_thread[t]):
            ev = waha_message(chat, "bench %s-%d-%d" % (tag, t, i), msg_id="B%s%02d%07d" % (tag, t, i))
            t0 = time.perf_counter()
            try:
                status, _ = post_webhook(url, ev, secret, conn)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(u.netloc, timeout=30)
            mine.append(time.perf_counter() - t0)
            if status != 200:
                with lock:
                    errors[0] += 1
            i += 1
        conn.close()
        with lock:
            lat.extend(mine)
            sent[0] += i

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put({"latencies": lat, "errors": errors[0], "sent": sent[0], "elapsed": time.perf_counter() - t0})


def _cpu_times(pid):
    """(user, system) CPU seconds of process *pid* so far, all its threads; None without /proc."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _machine_ticks():
    """(busy, total) clock ticks of all CPUs of the machine so far; None without /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)      # idle and iowait are not busy


def _drive_measured(pid, url, secret, concurrency, **kw):
    """``_drive``, and the server's CPU per request (user and system, µs) and how busy the machine was (%)."""
    cpu0, m0 = _cpu_times(pid), _machine_ticks()
    r = _drive(url, secret, concurrency, **kw)
    cpu1, m1 = _cpu_times(pid), _machine_ticks()
    if cpu0 and cpu1 and r["requests"]:
        r["cpu_user_us"] = round((cpu1[0] - cpu0[0]) / r["requests"] * 1e6)
        r["cpu_sys_us"] = round((cpu1[1] - cpu0[1]) / r["requests"] * 1e6)
    if m0 and m1 and m1[1] > m0[1]:
        r["machine_busy_pct"] = round(100.0 * (m1[0] - m0[0]) / (m1[1] - m0[1]))
    return r


def _drive(url, secret, concurrency, seconds=0.0, count=0, tag="x", procs=4):
    """Run up to *procs* load-generator processes; return rps and latency percentiles (ms)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    procs_n = max(1, min(concurrency, procs))
    out = ctx.Queue()
    share = [count // procs_n + (1 if i < count % procs_n else 0) for i in range(procs_n)]
    procs = [ctx.Process(target=_load_worker, args=(url, secret, seconds, share[i],
                                                    max(1, concurrency // procs_n), "%s%d" % (tag, i), out))
             for i in range(procs_n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(10)
    lat = [x for r in results for x in r["latencies"]]
    elapsed = max(r["elapsed"] for r in results)
    n = sum(r["sent"] for r in results)
    return {"concurrency": concurrency, "requests": n, "rps": round(n / elapsed, 1), "errors": sum(r["errors"] for r in results),
            "p50_ms": round(_pct(lat, 0.5) * 1000, 2), "p95_ms": round(_pct(lat, 0.95) * 1000, 2),
            "p99_ms": round(_pct(lat, 0.99) * 1000, 2)}


class _BaselineHandler(_SimHandler):
    """Answers every POST with 200 and does nothing else: the ceiling ingest is compared with."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def _baseline_server(port_out):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BaselineHandler)
    srv.daemon_threads = True
    port_out.put(srv.server_address[1])
    srv.serve_forever()


def _rss(pid):
    """Return (VmRSS, VmHWM) of *pid* in MB from /proc."""
    vals = {}
    with contextlib.suppress(OSError):
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    vals[k] = int(v.split()[0]) / 1024.0
    return round(vals.get("VmRSS", float("nan")), 1), round(vals.get("VmHWM", float("nan")), 1)


class _RssSampler:
    """Samples the bridge's RSS every 20 ms; ``peak`` is the largest since the last ``reset``."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid)[0])

    def reset(self):
        peak, self.peak = self.peak, _rss(self.pid)[0]
        return peak


def _await(predicate, limit):
    """Poll *predicate* every 50 ms for at most *limit* seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)


def _quiet(sim, seconds=1.0, limit=120.0):
    """Wait until *sim* has recorded no new call for *seconds* (the bridge's backlog is drained)."""
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(sim.calls)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.05)


class _BridgeProcess:
    """The bridge under test: `whatsignal.py serve` in its own process."""

    def __init__(self, tmp, waha, sig, secret, enc_secret):
        self.port = _free_port()
        self.cfg = os.path.join(tmp, "bench-config.json")
        with open(self.cfg, "w") as f:
            json.dump({"server": {"port": self.port},
                       "whatsapp": {"apiUrl": waha.url, "apiKey": waha.api_key, "webhookSecret": secret},
                       "signal": {"rpcUrl": sig.url, "number": "+15550000001", "destination": "+15550000002"},
                       "database": {"path": os.path.join(tmp, "bench.db")},
                       "media": {"cacheDir": os.path.join(tmp, "cache"), "maxSizeMB": 50},
                       "logLevel": "warn"}, f)
        self.env = dict(os.environ, WHATSIGNAL_ENCRYPTION_SECRET=enc_secret)
        self.log = open(os.path.join(tmp, "bench-bridge.log"), "ab")
        self.url = "http://127.0.0.1:%d" % self.port

    def start(self):
        import subprocess
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--config", self.cfg, "serve"],
                                     env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    c.close()
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.005)
        raise WhatSignalError("the bridge did not start; see bench-bridge.log")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except Exception:  # pragma: no cover - subprocess.TimeoutExpired
            self.proc.kill()
        self.log.flush()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _e2e_w2s(bridge, sig, secret, rate, seconds):
    """Offer *rate* messages/s for *seconds* from one paced connection; latency webhook -> Signal send."""
    sent, arrived = {}, {}
    lock = threading.Lock()

    def listen(call):
        msg = (call.get("params") or {}).get("message") or ""
        if "e2e-" in msg:
            key = msg.split("e2e-", 1)[1]
            with lock:
                arrived.setdefault(key, []).append(call["at"])
    sig.listeners.append(listen)
    u = urllib.parse.urlsplit(bridge.url)
    conn = http.client.HTTPConnection(u.netloc, timeout=30)
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        key = "%d-%s" % (i, secrets.token_hex(3))
        sent[key] = time.time()
        post_webhook(bridge.url + "/webhook/whatsapp", waha_message("4915100000%03d@c.us" % (i % 50),
                     "e2e-" + key, msg_id="E2E%08d%s" % (i, key[-6:].upper())), secret, conn)
    conn.close()
    _await(lambda: len(arrived) >= n, 60)
    sig.listeners.remove(listen)
    lat = [arrived[k][0] - sent[k] for k in sent if k in arrived]
    return {"offered_per_s": rate, "messages": n, "delivered": len(arrived),
            "lost": n - len(arrived), "duplicated": sum(len(v) - 1 for v in arrived.values()),
            "p50_ms": round(_pct(lat, 0.5) * 1000, 1), "p99_ms": round(_pct(lat, 0.99) * 1000, 1)}


def _burst_w2s(bridge, sig, secret, count, concurrency, tag="u", procs=4):
    """Post *count* messages as fast as WAHA would after a reconnect; time until all reach Signal."""
    seen = collections.Counter()
    lock = threading.Lock()
    first_last = []

    def listen(call):
        msg = (call.get("params") or {}).get("message") or ""
        if "bench " in msg:
            with lock:
                seen[msg.split("bench ", 1)[1]] += 1
                first_last.append(call["at"])
    sig.listeners.append(listen)
    t0 = time.time()
    ingest = _drive(bridge.url + "/webhook/whatsapp", secret, concurrency, count=count, tag=tag,   # own ids per burst
                    procs=procs)
    _await(lambda: len(seen) >= ingest["requests"], 120)
    sig.listeners.remove(listen)
    done = max(first_last) if first_last else time.time()
    span = (max(first_last) - min(first_last)) if len(first_last) > 1 else float("nan")
    return {"messages": ingest["requests"], "ingest_rps": ingest["rps"], "errors": ingest["errors"],
            "all_delivered_s": round(done - t0, 2), "delivered": len(seen),
            "lost": ingest["requests"] - len(seen), "duplicated": sum(v - 1 for v in seen.values()),
            "sustained_delivered_per_s": round(len(first_last) / span, 1) if span == span and span > 0 else None}


def _e2e_s2w(waha, sig, rate, count):
    """Owner messages pushed on the SSE stream at *rate* (0 = at once); latency envelope -> WAHA send."""
    sent, arrived = {}, {}
    lock = threading.Lock()

    def listen(call):
        text = (call.get("json") or {}).get("text") or ""
        if text.startswith("s2w-"):
            with lock:
                arrived.setdefault(text, []).append(call["at"])
    waha.listeners.append(listen)
    base = int(time.time() * 1000) * 10
    t0 = time.monotonic()
    for i in range(count):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        key = "s2w-%d-%d" % (base, i)
        sent[key] = time.time()
        sig.push(owner_envelope("+15550000002", base // 10 + i + 1, key))
    _await(lambda: len(arrived) >= count, 120)
    waha.listeners.remove(listen)
    at = [v[0] for v in arrived.values()]
    lat = [arrived[k][0] - sent[k] for k in sent if k in arrived]
    span = max(at) - min(at) if len(at) > 1 else float("nan")
    return {"offered_per_s": rate or "burst", "messages": count, "delivered": len(arrived), "lost": count - len(arrived),
            "duplicated": sum(len(v) - 1 for v in arrived.values()),
            "delivered_per_s": round(len(at) / span, 1) if span == span and span > 0 else None,
            "p50_ms": round(_pct(lat, 0.5) * 1000, 1), "p99_ms": round(_pct(lat, 0.99) * 1000, 1)}


def _media(bridge, waha, sig, secret, size_mb):
    """One video of *size_mb* MB through the bridge: seconds and the bridge's peak RSS growth."""
    data = b"\x00\x00\x00\x18ftypmp42" + os.urandom(size_mb * 1024 * 1024 - 12)
    waha.files["/api/files/default/BENCHVIDEO.mp4"] = ("video/mp4", data)
    rss_before, hwm_before = _rss(bridge.proc.pid)
    media = {"url": waha.url + "/api/files/default/BENCHVIDEO.mp4", "mimetype": "video/mp4", "filename": "clip.mp4"}
    n0 = len(sig.sends())
    t0 = time.perf_counter()
    post_webhook(bridge.url + "/webhook/whatsapp", waha_message("4915199999999@c.us", "video", media=media), secret)
    ok = sig.wait(lambda calls: len([c for c in calls if c["method"] == "send"]) > n0, 120)
    took = time.perf_counter() - t0
    _, hwm_after = _rss(bridge.proc.pid)
    del waha.files["/api/files/default/BENCHVIDEO.mp4"]
    return {"size_mb": size_mb, "delivered": ok, "seconds": round(took, 2),
            "rss_before_mb": rss_before, "peak_rss_mb": hwm_after,
            "peak_increase_mb": round(max(0.0, hwm_after - max(hwm_before, rss_before)), 1)}


def _fill(db_path, rows):
    """Put *rows* delivered queue items and *rows* mappings into the bench database (opaque bodies)."""
    db = sqlite3.connect(db_path)
    have = db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
    now = time.time()
    batch = 50000
    for start in range(have, rows, batch):
        n = min(batch, rows - start)
        db.executemany("INSERT INTO queue(channel, direction, dedupe, chat, kind, body, state, next_at, created_at,"
                       " updated_at) VALUES ('default','w2s',?,?,'message',?,'done',?,?,?)",
                       ((secrets.token_hex(16), secrets.token_hex(16), os.urandom(120), now, now, now) for _ in range(n)))
        db.executemany("INSERT INTO messages(channel, direction, wa_chat, wa_chat_enc, wa_msg, wa_msg_enc, sig_ts,"
                       " sig_author_enc, created_at) VALUES ('default','w2s',?,?,?,?,?,?,?)",
                       ((secrets.token_hex(16), os.urandom(60), secrets.token_hex(16), os.urandom(90),
                         1700000000000 + start + i, os.urandom(60), now) for i in range(n)))
        db.commit()
    db.close()
    # on disk before the bridge starts: else its first checkpoints' fsync also waits for the writeback of every
    # page written here (a few hundred MB), which no database that grew over months has pending
    fd = os.open(db_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_bench(quick=False, growth_rows=1000000, out=None, profile=None, tiny=False):
    """Measure this machine: baseline, ingest, end to end both ways, burst, memory, media, growth.
    *tiny*: loads so small that the run takes seconds; its figures only prove that each one is produced."""
    import multiprocessing
    import tempfile
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)
    quick = quick or tiny
    quiet = 0.3 if tiny else 1.0          # seconds without a new call: the bridge's backlog is drained
    secs = 0.2 if tiny else 1.5 if quick else 3.0
    burst = 100 if tiny else 1000 if quick else 5000
    history = 100 if tiny else 4000 if quick else 20000
    growth_rows = 2000 if tiny else min(growth_rows, 20000) if quick else growth_rows
    procs = 1 if tiny else 4              # load-generator processes (each a fresh interpreter to spawn)
    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}}
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    base_proc = ctx.Process(target=_baseline_server, args=(q,), daemon=True)
    base_proc.start()
    base_url = "http://127.0.0.1:%d/webhook/whatsapp" % q.get(timeout=30)
    secret = secrets.token_urlsafe(32)
    say("bench: baseline (bare ThreadingHTTPServer, same load generator)...")
    results["baseline"] = {c: _drive_measured(base_proc.pid, base_url, secret, c, seconds=secs, tag="b", procs=procs)
                           for c in (1, 8, 32)}
    base_proc.terminate()
    with tempfile.TemporaryDirectory(prefix="whatsignal-bench-") as tmp:
        waha, sig = WahaSim(), SignalSim(keepalive=5.0)
        bridge = _BridgeProcess(tmp, waha, sig, secret, secrets.token_urlsafe(32))
        if profile:
            bridge.env["WHATSIGNAL_PROFILE"] = os.path.abspath(profile)
        try:
            results["startup_s"] = round(bridge.start(), 3)
            time.sleep(0.2 if tiny else 1.0)
            results["rss_idle_mb"], results["rss_hwm_start_mb"] = _rss(bridge.proc.pid)
            sampler = _RssSampler(bridge.proc.pid)
            say("bench: ingest...")
            results["ingest"] = {c: _drive_measured(bridge.proc.pid, bridge.url + "/webhook/whatsapp", secret, c,
                                                    seconds=secs, tag="i%d" % c, procs=procs) for c in (1, 8, 32)}
            _quiet(sig, quiet)
            say("bench: end to end WhatsApp -> Signal...")
            results["w2s_at_200"] = _e2e_w2s(bridge, sig, secret, 200, 1 if tiny else 2 if quick else 5)
            _quiet(sig, quiet)
            results["burst"] = _burst_w2s(bridge, sig, secret, burst, 32, procs=procs)
            _quiet(sig, quiet)
            say("bench: end to end Signal -> WhatsApp...")
            results["s2w_at_200"] = _e2e_s2w(waha, sig, 200, 100 if tiny else 400 if quick else 1000)
            _quiet(waha, quiet)
            results["s2w_burst"] = _e2e_s2w(waha, sig, 0, burst)
            _quiet(waha, quiet)
            results["rss_peak_mb"] = sampler.reset()
            say("bench: history sync after a re-login (%d messages)..." % history)
            results["history"] = _burst_w2s(bridge, sig, secret, history, 8, tag="h", procs=procs)
            _quiet(sig, quiet)
            results["history"]["peak_rss_mb"] = sampler.reset()
            results["history"]["vmhwm_mb"] = _rss(bridge.proc.pid)[1]
            say("bench: media...")
            results["media"] = _media(bridge, waha, sig, secret, 1 if tiny else 5 if quick else 20)
            results["media"]["peak_rss_mb"] = sampler.reset()
            results["media"]["peak_increase_mb"] = round(results["media"]["peak_rss_mb"] - results["media"]["rss_before_mb"], 1)
            sampler.stop.set()
            results["rss_hwm_mb"] = _rss(bridge.proc.pid)[1]
            bridge.stop()
            say("bench: growth (%d rows)..." % growth_rows)
            growth = {}
            for rows in ((1000 if tiny else 10000), growth_rows):
                _fill(os.path.join(tmp, "bench.db"), rows)
                bridge.start()
                runs = [_drive(bridge.url + "/webhook/whatsapp", secret, 8, seconds=secs, tag="g%d%d" % (rows, k),
                               procs=procs)
                        for k in range(1 if tiny else 2)]   # two runs, averaged: one 3 s run on 2 shared cores is noisy
                growth[rows] = {k: round(sum(r[k] for r in runs) / len(runs), 2)
                                for k in ("rps", "p50_ms", "p95_ms", "p99_ms")}
                growth[rows]["errors"] = sum(r["errors"] for r in runs)
                bridge.stop()
            results["growth"] = growth
        finally:
            with contextlib.suppress(Exception):
                bridge.stop()
            waha.close()
            sig.close()
    _bench_report(results, say)
    say(json.dumps(results, separators=(",", ":"), default=str))
    return 0


class ThreadProfiler:
    """cProfile for every HTTP handler and worker thread of a serving bridge (``bench --profile DIR``).

    cProfile sees only the thread it runs in; this wraps each thread's work in
    its own profile and, at the end, merges them into DIR/bridge.prof and a
    readable DIR/bridge-top.txt (by own time).
    """

    def __init__(self, directory):
        import cProfile
        self.cProfile, self.directory = cProfile, directory
        self.profiles, self.lock = [], threading.Lock()

    def wrap(self, fn):
        def profiled(*args, **kwargs):
            prof = self.cProfile.Profile()
            with self.lock:
                self.profiles.append(prof)
            return prof.runcall(fn, *args, **kwargs)
        return profiled

    def install(self):
        Handler.handle = self.wrap(Handler.handle)
        Worker._run_safely = self.wrap(Worker._run_safely)

    def dump(self):
        import pstats
        with self.lock:
            profiles = list(self.profiles)
        if not profiles:
            return
        os.makedirs(self.directory, exist_ok=True)
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            stats.add(prof)
        stats.dump_stats(os.path.join(self.directory, "bridge.prof"))
        with open(os.path.join(self.directory, "bridge-top.txt"), "w") as f:
            pstats.Stats(os.path.join(self.directory, "bridge.prof"), stream=f).sort_stats("tottime").print_stats(40)


def _bench_report(r, say):
    b8 = r["baseline"][8]["rps"]
    say("\n%-30s %8s %8s %8s %8s %7s %17s %7s" % ("", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                                                "server CPU/req", "busy"))
    for name in ("baseline", "ingest"):
        for c, x in r[name].items():
            cpu = ("%d+%d us" % (x["cpu_user_us"], x["cpu_sys_us"])) if "cpu_user_us" in x else "-"
            busy = ("%d %%" % x["machine_busy_pct"]) if "machine_busy_pct" in x else "-"
            say("%-30s %8.0f %8.2f %8.2f %8.2f %7d %17s %7s" % ("%s, concurrency %d" % (name, c), x["rps"], x["p50_ms"],
                                                              x["p95_ms"], x["p99_ms"], x["errors"], cpu, busy))
    say("(server CPU/req: user+system CPU of the server process per request; busy: all CPUs of the machine, "
        "load generators included)")
    say("ingest/baseline at concurrency 8: %.0f%%" % (100.0 * r["ingest"][8]["rps"] / b8))
    w, s2 = r["w2s_at_200"], r["s2w_at_200"]
    say("WhatsApp->Signal at %s/s: p50 %.1f ms, p99 %.1f ms, lost %d, duplicated %d"
        % (w["offered_per_s"], w["p50_ms"], w["p99_ms"], w["lost"], w["duplicated"]))
    bu = r["burst"]
    say("WhatsApp->Signal burst of %d: all delivered in %.2f s, sustained %s msg/s, lost %d, duplicated %d"
        % (bu["messages"], bu["all_delivered_s"], bu["sustained_delivered_per_s"], bu["lost"], bu["duplicated"]))
    say("Signal->WhatsApp at %s/s: p50 %.1f ms, p99 %.1f ms, lost %d, duplicated %d"
        % (s2["offered_per_s"], s2["p50_ms"], s2["p99_ms"], s2["lost"], s2["duplicated"]))
    sb = r["s2w_burst"]
    say("Signal->WhatsApp burst of %d: sustained %s msg/s, lost %d, duplicated %d"
        % (sb["messages"], sb["delivered_per_s"], sb["lost"], sb["duplicated"]))
    hi = r["history"]
    say("history sync of %d (WhatsApp->Signal): ingest %.0f req/s, all delivered in %.2f s, lost %d, duplicated %d, "
        "bridge peak RSS %.1f MB (VmHWM %.1f MB)" % (hi["messages"], hi["ingest_rps"], hi["all_delivered_s"], hi["lost"],
                                                    hi["duplicated"], hi["peak_rss_mb"], hi["vmhwm_mb"]))
    say("start-up to /healthz: %.3f s; RSS idle %.1f MB, peak under load %.1f MB; VmHWM (kernel high-water mark, "
        "key derivation included) %.1f MB after start, %.1f MB at the end" % (
            r["startup_s"], r["rss_idle_mb"], r["rss_peak_mb"], r["rss_hwm_start_mb"], r["rss_hwm_mb"]))
    m = r["media"]
    say("media: %d MB video in %.2f s, peak RSS increase %.1f MB" % (m["size_mb"], m["seconds"], m["peak_increase_mb"]))
    g = r["growth"]
    keys = sorted(g)
    say("growth: ingest at concurrency 8 with %s rows: %s req/s (p99 %s ms) -> with %s rows: %s req/s (p99 %s ms), %+.1f%%"
        % (keys[0], g[keys[0]]["rps"], g[keys[0]]["p99_ms"], keys[-1], g[keys[-1]]["rps"], g[keys[-1]]["p99_ms"],
           100.0 * (g[keys[-1]]["rps"] - g[keys[0]]["rps"]) / g[keys[0]]["rps"]))


def _reexec_as_module(argv):
    """For ``serve``: start again as an imported module, in the same process (same PID).

    CPython keeps the syntax tree of a file run as a script until the script
    ends; for this file that is about 12 MB held for the life of the service.
    Imported, the tree is freed right after compiling.
    """
    path = os.path.abspath(__file__)
    code = ("import importlib.machinery, importlib.util, sys; sys.path[0] = %r; "
            "spec = importlib.util.spec_from_loader('whatsignal', importlib.machinery.SourceFileLoader('whatsignal', %r)); "
            "m = importlib.util.module_from_spec(spec); sys.modules['whatsignal'] = m; spec.loader.exec_module(m); "
            "sys.exit(m.main(sys.argv[1:]))") % (os.path.dirname(path), path)   # this very file, whatever its name
    os.environ["WHATSIGNAL_REEXEC"] = "0"
    os.execv(sys.executable, [sys.executable, "-c", code] + argv)


if __name__ == "__main__":
    if os.environ.get("WHATSIGNAL_REEXEC") != "0" and \
            next((a for a in sys.argv[1:] if a in dict(COMMANDS) or a in ("-h", "--help", "--version")), "serve") == "serve":
        with contextlib.suppress(OSError):
            _reexec_as_module(sys.argv[1:])
    sys.exit(main())
