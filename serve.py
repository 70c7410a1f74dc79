"""The pre-ranking service: an export loaded once and scored over HTTP (standard library server).

    python serve.py --run_dir runs/RUN [--host 127.0.0.1 --port 8000]
    curl -s localhost:8000/health                                  # status and the export's manifest md5
    curl -s localhost:8000/score -d '{"user_id": 1, "top_k": 10}'  # the whole catalogue
    curl -s localhost:8000/score -d '{"user_features": {"gender": "F", "age": 25}, "candidates": [1, 2, 3]}'
    curl -s -X POST localhost:8000/reload                          # swap in a new export (or: kill -HUP PID)
    python serve.py --run_dir runs/RUN --load_test                 # bounded load test (docs/serving.md)

POST /score takes a JSON object with user_id (an integer, or the text id of data sets that have them;
unknown ids take the out-of-vocabulary path) and/or
user_features (raw values of the user's sparse fields), optional candidates (item ids, all in the index)
and top_k (default 10); it answers the ranked items with their scores. A bad request (unknown field, wrong
type, top_k <= 0, a candidate not in the index, a body over --max_body bytes, invalid JSON) is answered
400 with one line; a reload loads the new export beside the old one and swaps it in with one assignment,
so requests in flight finish on the old one and none fails.
"""
import contextlib
import http.client
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from model_config import Parser
from scorer import Scorer
from util import UserError, run_cli, say

FIELDS = {"user_id": (int, str), "user_features": dict, "candidates": list, "top_k": int}


class NotFound(UserError):
    """No such endpoint (404)."""


def parse_request(body, scorer):
    """(user_id, features, candidates, top_k) of a /score body, or UserError with the one-line reason."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise UserError("the body must be a JSON object")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    for name, kind in FIELDS.items():  # bool is an int in Python, never in this API
        if name in request and (not isinstance(request[name], kind) or isinstance(request[name], bool)):
            raise UserError(f"{name} must be {'an object' if kind is dict else 'a list' if kind is list else 'an integer' if kind is int else 'an integer or a text id'}")
    if "user_id" not in request and "user_features" not in request:
        raise UserError("give user_id, user_features or both")
    user_id = request.get("user_id", -1)
    if isinstance(user_id, int) and abs(user_id) >= 2**63:
        raise UserError("user_id must fit in 64 bits")
    if isinstance(user_id, str) and scorer.user_names is None:
        raise UserError("user_id must be an integer (this data set's user ids are integers)")
    top_k = request.get("top_k", 10)
    if top_k <= 0:
        raise UserError(f"top_k must be positive, got {top_k}")
    features = request.get("user_features")
    if features and not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in features.values()):
        raise UserError("user_features values must be strings or integers")
    candidates = request.get("candidates")
    if candidates is not None:
        text_ids = scorer.item_names is not None
        if not all((isinstance(c, int) and not isinstance(c, bool)) or (text_ids and isinstance(c, str))
                   for c in candidates):
            raise UserError("candidates must be a list of item ids" + (" (integers or text ids)" if text_ids else
                                                                       " (integers)"))
        if any(isinstance(c, int) and abs(c) >= 2**63 for c in candidates):
            raise UserError("candidate ids must fit in 64 bits")
        missing = scorer.unknown_items(candidates)
        if missing:
            raise UserError(f"{len(missing)} candidate id(s) not in the index: {', '.join(map(str, missing[:10]))}")
    return user_id, features, candidates, top_k


class Service:
    """The current Scorer and how to replace it; handlers read `scorer` once per request."""

    def __init__(self, export_dir, user_tower="auto", nprobe=0, threads=1):
        self.export_dir, self.user_tower, self.nprobe, self.threads = Path(export_dir), user_tower, nprobe, threads
        self.scorer = Scorer(self.export_dir, user_tower=user_tower, nprobe=nprobe, threads=threads)
        self.warm(self.scorer)
        self.reloads, self._reload_lock = 0, threading.Lock()

    @staticmethod
    def warm(scorer):
        """One request before the scorer takes traffic: first calls allocate and load kernels (~100+ ms)."""
        scorer.recommend(int(scorer.users["key"][0]), top_k=10)

    def reload(self):
        """Load the export folder again and swap it in; a failure leaves the running export serving."""
        with self._reload_lock:
            started = time.perf_counter()
            new = Scorer(self.export_dir, user_tower=self.user_tower, nprobe=self.nprobe, threads=self.threads)
            self.warm(new)
            self.scorer = new  # one reference assignment: each request uses the scorer it started with
            self.reloads += 1
            return {"reloaded": True, "manifest_md5": new.checksum,
                    "milliseconds": round((time.perf_counter() - started) * 1000, 1)}

    def health(self):
        s = self.scorer
        return {"status": "ok", "export_dir": str(self.export_dir), "manifest_md5": s.checksum,
                "model": s.manifest["model"], "items": s.manifest["items"], "user_tower": s.backend,
                "retrieval": f"ivf, nprobe {s.nprobe} of {len(s.ivf.cells)} cells" if s.ivf else "exact",
                "maxsim": "numpy" if s.kernel is None else "kernel",
                "threads": s.threads,
                "blas_threads": max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
                                    default=None),
                "reloads": self.reloads}


def make_handler(service, max_body):
    """The request handler class of `service`: GET /health, POST /score and /reload, one-line 400s. A class
    made here (rather than at module level) so it can close over the service and the body limit; its length
    is the class's."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
        disable_nagle_algorithm = True  # else each answer waits ~40 ms for the client's delayed ACK (measured)
        wbufsize = 1 << 16  # headers and body leave in one send, at the flush after each request

        def log_message(self, *args):  # no line per request
            pass

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise UserError("a Content-Length header is required")
            if int(length) > max_body:  # not read: the connection is closed after the answer
                self.close_connection = True
                raise UserError(f"the body is {int(length):,} bytes, over the limit of {max_body:,}")
            return self.rfile.read(int(length))

        def handle_one(self, work):
            try:
                self.reply(200, work())
            except UserError as e:
                self.reply(404 if isinstance(e, NotFound) else 400, {"error": str(e)})
            except Exception as e:  # a bug, not the client's fault: still one line, and the server goes on
                self.reply(500, {"error": f"internal error: {type(e).__name__}: {e}"})

        def do_GET(self):
            if self.path == "/health":
                self.handle_one(service.health)
            else:
                self.handle_one(lambda: self.not_found("GET /health"))

        def do_POST(self):
            if self.path == "/score":
                def score():
                    body = self.body()
                    scorer = service.scorer
                    user_id, features, candidates, top_k = parse_request(body, scorer)
                    return scorer.recommend(user_id, candidates, top_k, features)
                self.handle_one(score)
            elif self.path == "/reload":
                def reload():
                    if self.headers.get("Content-Length", "0") != "0":
                        self.body()  # read (and ignore) a body, so that the connection stays usable
                    try:
                        return service.reload()
                    except UserError as e:
                        raise UserError(f"reload failed, still serving the previous export: {e}") from None
                self.handle_one(reload)
            else:
                self.handle_one(lambda: self.not_found("POST /score, POST /reload"))

        def not_found(self, allowed):
            raise NotFound(f"no endpoint {self.command} {self.path}; the endpoints are {allowed}")

    return Handler


def serve(export_dir, host, port, max_body, user_tower="auto", ready=None, nprobe=0, threads=1):
    service = Service(export_dir, user_tower, nprobe, threads)
    server = ThreadingHTTPServer((host, port), make_handler(service, max_body))
    server.daemon_threads = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload, daemon=True).start())
    say(f"serving {export_dir} (manifest md5 {service.scorer.checksum}, user tower {service.scorer.backend}) "
        f"on http://{host}:{server.server_address[1]}")
    print(f"PORT {server.server_address[1]}", flush=True)  # the load test reads the chosen port from here
    if ready is not None:
        ready(server, service)
    server.serve_forever()


# ---------------------------------------------------------------- load test

def request(conn, method, path, body=None):
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def load_phase(port, bodies, clients, count, time_limit, reload_at=None):
    """`count` requests (or until `time_limit` s) from `clients` threads, each on one keep-alive connection;
    when `reload_at` requests are done, another connection asks for a reload. Returns latencies, failures."""
    latencies, failures, reload_result, reloading = [], [], {}, []
    lock, next_index = threading.Lock(), iter(range(count))
    deadline = time.perf_counter() + time_limit

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                status, data = request(conn, "POST", "/score", bodies[i % len(bodies)])
            except (OSError, http.client.HTTPException) as e:
                status, data = None, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    failures.append(f"{status}: {data[:200]!r}")
                if reload_at is not None and len(latencies) == reload_at:
                    reloading.append(threading.Thread(target=reloader, daemon=True))
                    reloading[-1].start()
        conn.close()

    def reloader():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        status, data = request(conn, "POST", "/reload")
        reload_result.update(json.loads(data) if status == 200 else {"failed": f"{status}: {data[:200]!r}"})
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for t in reloading:  # a reload that outlasts the phase is still reported
        t.join(120)
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "failed": len(failures), "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "reload": reload_result or None,
            "first_failures": failures[:3]}


def load_test(run_dir, export_dir, requests, time_limit, clients_list, top_k, candidates, server_args=()):
    """Start this service on a free loopback port in a child process, run one bounded load phase per number
    of concurrent clients (a reload in the middle of each), stop the child, return the figures."""
    export_dir = Path(export_dir) if export_dir else Path(run_dir) / "export"
    users = np.load(export_dir / "users.npz")["key"]
    item_ids = np.load(export_dir / "item_ids.npy")
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(256):
        request_ = {"user_id": int(rng.choice(users)), "top_k": top_k}
        if candidates:
            request_["candidates"] = rng.choice(item_ids, min(candidates, len(item_ids)), replace=False).tolist()
        bodies.append(json.dumps(request_).encode())
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--export_dir", str(export_dir),
                              "--port", "0", *server_args], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("PORT "):  # the log lines before it
            line = child.stdout.readline()
            if not line:
                raise UserError(f"the server did not start (exit status {child.wait(timeout=30)})")
        port = int(line.split()[1])
        health = json.loads(request(http.client.HTTPConnection("127.0.0.1", port, timeout=30), "GET", "/health")[1])
        load_phase(port, bodies, 1, 50, time_limit)  # untimed warm-up of the connections and threads
        phases = []
        for clients in clients_list:
            phases.append(load_phase(port, bodies, clients, requests, time_limit, reload_at=requests // 2))
            say(json.dumps(phases[-1]))
        return {"what": "load", "export_dir": str(export_dir), "requests_per_phase": requests, "top_k": top_k,
                "candidates": candidates or "whole catalogue", "server": health, "phases": phases}
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()


def main(argv=None):
    parser = Parser(prog="serve.py", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run_dir", help="a run whose export is in RUN/export (python export.py --run_dir RUN)")
    where.add_argument("--export_dir", help="an export folder (python export.py --output_dir DIR)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed as 'PORT n')")
    parser.add_argument("--max_body", type=int, default=1 << 20, help="largest request body in bytes")
    parser.add_argument("--user_tower", default="auto", choices=Scorer.USER_TOWERS,
                        help="auto: ONNX Runtime on user_tower.onnx when exported, else the MINDIR")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="whole-catalogue requests: 0 scores every item exactly; N > 0 scores the items of the "
                             "user's N best cells of an inverted file (for large catalogues; docs/serving.md)")
    parser.add_argument("--threads", "--blas_threads", type=int, default=1, dest="threads",
                        help="threads per request, of the MaxSim kernel and of BLAS (default 1: concurrent requests "
                             "share the cores, measured best under load; 0: every core for each request)")
    load = parser.add_argument_group("load test (--load_test): a server child on a free loopback port")
    load.add_argument("--load_test", action="store_true", help="run the bounded load test and print JSON")
    load.add_argument("--requests", type=int, default=2000, help="requests per number of clients")
    load.add_argument("--time_limit", type=float, default=60.0, help="seconds at most per number of clients")
    load.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients")
    load.add_argument("--top_k", type=int, default=100, help="top_k of every request")
    load.add_argument("--candidates", type=int, default=0, help="candidates per request (0: the whole catalogue)")
    args = parser.parse_args(argv)
    export_dir = Path(args.export_dir) if args.export_dir else Path(args.run_dir) / "export"
    if args.nprobe < 0:
        parser.error(f"--nprobe must be 0 or positive, got {args.nprobe}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 or positive, got {args.threads}")
    if args.load_test:
        try:
            clients = [int(c) for c in args.clients.split(",")]
        except ValueError:
            parser.error(f"--clients expects comma-separated integers, got {args.clients!r}")
        if args.requests <= 0 or args.time_limit <= 0 or min(clients) <= 0 or args.top_k <= 0:
            parser.error("--requests, --time_limit, --clients and --top_k must be positive")
        with contextlib.redirect_stdout(sys.stderr):  # progress lines to stderr: stdout is the JSON result alone
            result = load_test(args.run_dir, args.export_dir, args.requests, args.time_limit, clients, args.top_k,
                               args.candidates, ["--user_tower", args.user_tower, "--nprobe", str(args.nprobe),
                                                 "--threads", str(args.threads)])
        print(json.dumps(result, indent=1))
        return
    if not (0 <= args.port < 65536):
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.threads:  # process-wide, so only here: the command, not serve() that tests call in-process
        threadpool_limits(args.threads, user_api="blas")
    try:
        serve(export_dir, args.host, args.port, args.max_body, args.user_tower, nprobe=args.nprobe,
              threads=args.threads)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None


if __name__ == "__main__":
    run_cli(main)
