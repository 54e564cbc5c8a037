"""difflab studio's API (difflab/studio/): the token, names that cannot leave the runs folder, PNG settings, the
history, the queue (FIFO, cancel, 429), bad input fuzzed (4xx, never 5xx, the runs folder unchanged), a load of
concurrent requests and a restart.

The page itself is driven in a real browser in test_studio_browser.py; the studio's overhead over the same
``run.sample`` call and the cost of its previews are measured by benchmarks/studio.py, not here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import difflab
from difflab.cli.studio import needs_token
from difflab.data.images import to_model, to_uint8
from difflab.runs import shipped
from difflab.studio import pngs
from difflab.studio.app import create_app, job_events
from difflab.studio.folder import NotFound, check_name
from difflab.studio.history import History
from difflab.studio.jobs import Job, Limits

FINISHED = ("done", "cancelled", "failed", "interrupted")


# --------------------------------------------------------------------------- a real server, in a thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(root: Path, **kw):
    """The studio over ``root`` on a free loopback port (uvicorn in a thread); yields its URL."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(root, **kw), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the studio did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def call(
    url: str,
    method: str = "GET",
    body=None,
    *,
    raw: bytes | None = None,
    headers: dict | None = None,
    files: dict | None = None,
) -> tuple[int, bytes, dict]:
    """One request: (status, body bytes, headers); JSON bodies from ``body``, or ``raw`` bytes as they are."""
    data, h = raw, dict(headers or {})
    if body is not None:
        data, h["Content-Type"] = json.dumps(body).encode(), "application/json"
    if files is not None:
        boundary = "studio-test-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\nContent-Type: '
            "image/png\r\n\r\n".encode()
            + v
            + b"\r\n"
            for k, v in files.items()
        ]
        data, h["Content-Type"] = (
            b"".join(parts) + f"--{boundary}--\r\n".encode(),
            f"multipart/form-data; boundary={boundary}",
        )
    request = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def api(url: str, method: str = "GET", body=None, expect: int = 200, **kw):
    status, data, _ = call(url, method, body, **kw)
    assert status == expect, (status, data[:300])
    return json.loads(data) if data[:1] in (b"{", b"[") else data


def follow(base: str, id: str):
    """The states of a job's Server-Sent Events stream as they come, in order, from its first to its end (closing
    the generator early closes the stream)."""
    with urllib.request.urlopen(f"{base}/api/jobs/{id}/events", timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])


def events(base: str, id: str) -> list[dict]:
    """Every state of a job its Server-Sent Events stream sent, in order, until its end."""
    return list(follow(base, id))


def wait(base: str, id: str) -> dict:
    """A job once it has finished: its events stream followed to its end (the finished state), then asked for."""
    assert events(base, id)[-1]["status"] in FINISHED
    return api(f"{base}/api/jobs/{id}")


def running(base: str, id: str) -> dict:
    """A job's first state running with a step taken (a failure if it ends first), from its events stream."""
    for job in follow(base, id):
        assert job["status"] in ("queued", "running"), job
        if job["status"] == "running" and job["step"] > 0:
            return job
    raise AssertionError(f"job {id} ended without a step")


def runs_folder(tmp_path: Path, **runs: Path) -> Path:
    """A runs folder of copies (the studio writes its .studio/ folder into it; the shared runs stay untouched)."""
    root = tmp_path / "runs"
    root.mkdir()
    for name, source in runs.items():
        shutil.copytree(source, root / name)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def resident_mib() -> float:
    """This process's resident memory now (Linux /proc), in MiB (the server runs in this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def png_array(data: bytes) -> np.ndarray:
    x, _ = pngs.decode(data)
    return x.numpy()


# --------------------------------------------------------------------------- without a trained run


def test_names_cannot_leave_the_runs_folder(tmp_path):
    for bad in ("..", "../x", "a/b", ".studio", "/etc", "a\\b", "", "x" * 200, "a\x00b", ".hidden"):
        with pytest.raises(NotFound):
            check_name(bad)
    assert check_name("digits-dc_2.v1") == "digits-dc_2.v1"
    outside = tmp_path / "outside"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    root = tmp_path / "runs"
    root.mkdir()
    (root / "escape").symlink_to(outside)  # a link that leaves the folder is not a run of it
    with served(root) as base:
        assert [r["name"] for r in api(f"{base}/api/runs")["runs"] if not r["shipped"]] == []
        assert "error" in api(f"{base}/api/runs/escape", expect=404)
        assert api(f"{base}/api/runs/..%2F..%2Fetc", expect=404)


def test_token_guards_every_request(tmp_path):
    assert (
        not needs_token("127.0.0.1")
        and not needs_token("::1")
        and needs_token("0.0.0.0")
        and needs_token("example.org")
    )
    with served(tmp_path, token="s3cret") as base:
        for path in ("/", "/api/runs", "/docs", "/openapi.json", "/static/app.js", "/api/history"):
            status, data, _ = call(base + path)
            assert status == 401 and "token" in json.loads(data)["error"], path
        assert call(base + "/api/runs", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(base + "/api/runs", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(base + "/api/runs?token=s3cret")[0] == 200
        status, _, headers = call(
            base + "/?token=s3cret"
        )  # the page gets a cookie, so its own requests carry the token
        assert status == 200 and "difflab_studio_token=s3cret" in headers.get("set-cookie", "")
        assert call(base + "/static/app.js", headers={"Cookie": "difflab_studio_token=s3cret"})[0] == 200


def test_png_parameters_round_trip():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    settings = {"run": "t2i", "prompt": "a red sneaker", "seed": 3, "guidance": 4.0, "fingerprint": "0123456789abcdef"}
    x, s = pngs.decode(pngs.encode(image, settings))
    assert torch.equal(x, image) and s == settings
    assert pngs.decode(pngs.encode(image[:1]), 1)[1] is None
    for bad in (b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a" + b"\0" * 20):
        with pytest.raises(pngs.ImageError):
            pngs.decode(bad)


def test_history_marks_unfinished_jobs_interrupted(tmp_path):
    h = History(tmp_path / "h.sqlite")
    for i, status in enumerate(("done", "queued", "running", "failed")):
        h.add(f"{i:016x}", "generate", "dc", {"prompt": f"a {status} 50%_x", "seed": i}, created=i)
        if status != "queued":
            h.finish(f"{i:016x}", status) if status != "running" else h.set_status(f"{i:016x}", "running")
    h.close()
    h = History(tmp_path / "h.sqlite")
    assert h.interrupted == 2
    assert [r["status"] for r in h.search(status=None)] == ["failed", "interrupted", "interrupted", "done"]
    assert [r["settings"]["seed"] for r in h.search("DONE 50%_", status=None)] == [0]  # LIKE's wildcards are literal
    assert h.search("50%x", status=None) == []


def stream(job) -> list[dict]:
    """Every state the events stream of ``job`` sends, until its end (no server: the stream's generator itself)."""

    async def connected() -> bool:
        return False

    async def states() -> list[dict]:
        return [json.loads(event.removeprefix("data: ")) async for event in job_events(job, connected)]

    return asyncio.run(states())


def test_events_stream_ends_on_the_finished_state():
    """The stream once sent snapshots of the job, polled: the worker thread could finish the job between the
    snapshot and the stream's test for the end, and the stream ended after a "running" event (the page, never told
    the job ended, waited for ever). Now every state is appended to the job's log as it happens and the stream
    sends the log: its last event is the finished state, and a job finished before the stream opened gives all."""
    job = Job("0" * 16, "forward", "dc", {}, status="running")
    job.update(finished=time.time(), status="done")  # the worker finishes the job before the stream is opened
    states = stream(job)
    assert [s["status"] for s in states] == ["running", "done"] and states[-1]["finished"] is not None
    assert [s["status"] for s in stream(Job("1" * 16, "forward", "dc", {}, status="failed", error="x"))] == ["failed"]


def test_events_stream_misses_no_state():
    """A job whose states change faster than anyone could poll them (a worker thread taking 2000 steps with a
    preview every 5, then finishing while the stream drains): the stream sends every state, in order, each once."""
    job = Job("2" * 16, "generate", "dc", {}, steps=2000)
    opened = threading.Event()

    def worker():
        opened.wait(30)
        job.update(status="running", started=time.time())
        for k in range(1, 2001):
            job.update(step=k, previews=job.previews + (k % 5 == 0))
        job.update(finished=time.time(), status="done")

    threading.Thread(target=worker, daemon=True).start()

    async def connected() -> bool:
        opened.set()  # the stream has drained the first state and waits: the worker starts
        return False

    async def states() -> list[dict]:
        return [json.loads(event.removeprefix("data: ")) async for event in job_events(job, connected)]

    states = asyncio.run(states())
    assert [s["status"] for s in states] == ["queued", "running"] + ["running"] * 2000 + ["done"]
    assert [s["step"] for s in states[2:-1]] == list(range(1, 2001))
    assert [s["previews"] for s in states if s["status"] == "running" and s["step"] % 5 == 0][1:] == list(range(1, 401))


def test_a_shipped_model_has_its_card_and_its_best_guidance(tmp_path):
    """A newcomer's empty runs folder: the shipped text model's info carries its card (the recipe's figures and
    commands) and the guidance it was measured best at (its recipe's scale, 5: run.default_sampling), which a job
    naming no guidance gets, as the library's sample does."""
    name, prompt = "fashion-pairs-t2i", "a red sneaker on the left and a blue bag on the right"
    recipe = shipped.recipe(name)
    run = difflab.load(name)
    assert run.default_sampling().guidance == recipe["figures"]["scale"] == 5.0
    assert torch.equal(
        run.sample(1, prompt=prompt, steps=2, seed=0), run.sample(1, prompt=prompt, guidance=5.0, steps=2, seed=0)
    )
    with served(tmp_path) as base:
        info = api(f"{base}/api/runs/{name}")
        assert info["shipped"] and info["card"]["figures"] == recipe["figures"]
        assert info["card"]["commands"] == recipe["commands"] and info["card"]["what"] == recipe["what"]
        assert info["card"]["steps"] == " + ".join(map(str, recipe.get("stage_steps", [recipe["steps"]])))
        assert info["guidance"] == 5.0 and info["sampling"] == {"sampler": "dpmpp-2m", "steps": 20}
        ae = api(f"{base}/api/runs/fashion-pairs-ae")  # a shipped model that makes no images has its card too
        assert ae["card"]["figures"] == shipped.recipe("fashion-pairs-ae")["figures"] and ae["guidance"] is None
        job = wait(
            base, api(f"{base}/api/generate", "POST", {"run": name, "prompt": prompt, "steps": 2, "seed": 0})["id"]
        )
        assert job["status"] == "done" and job["settings"]["guidance"] == 5.0, job
        direct = to_uint8(run.sample(1, prompt=prompt, steps=2, seed=0))[0].numpy()
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/0.png")), direct)


# --------------------------------------------------------------------------- on a trained digits run


@pytest.fixture
def digits_studio(tmp_path, digits_runs):
    return runs_folder(tmp_path, dc=digits_runs / "dc", clf=digits_runs / "clf")


def test_generate_reproduce_from_png(digits_studio):
    run = difflab.load(digits_studio / "dc")
    with served(digits_studio) as base:
        runs = {r["name"]: r for r in api(f"{base}/api/runs")["runs"]}
        assert runs["dc"]["generates"] and runs["dc"]["classes"] == 10 and runs["dc"]["parameters"] > 0
        assert not runs["clf"]["generates"]
        detail = api(f"{base}/api/runs/dc")
        assert detail["metrics"] and detail["metrics"][-1]["step"] == detail["steps_trained"]
        job = api(
            f"{base}/api/generate",
            "POST",
            {"run": "dc", "class_label": 7, "guidance": 2, "steps": 10, "seed": 5, "batch": 3},
        )
        done = wait(base, job["id"])
        assert done["status"] == "done" and done["images"] == 3 and done["previews"] >= 1
        direct = to_uint8(run.sample(3, class_label=7, guidance=2, steps=10, seed=5)).numpy()
        for i in range(3):
            png = api(f"{base}/api/jobs/{job['id']}/images/{i}.png")
            assert np.array_equal(png_array(png), direct[i])
            back = api(f"{base}/api/parameters", "POST", files={"file": png})
            assert back["same_weights"] and back["settings"]["seed"] == 5 + i and back["settings"]["batch"] == 1
            s = {
                k: v
                for k, v in back["settings"].items()
                if k in ("run", "class_label", "guidance", "steps", "seed", "batch", "sampler")
            }
            again = wait(base, api(f"{base}/api/generate", "POST", s)["id"])  # the PNG's settings make the same pixels
            assert np.array_equal(png_array(api(f"{base}/api/jobs/{again['id']}/images/0.png")), direct[i])
        assert len(api(f"{base}/api/history?limit=10")["jobs"]) == 4


def test_queue_is_fifo_and_cancels_the_third(digits_studio):
    with served(digits_studio, limits=Limits(max_queue=8)) as base:
        ids = [
            api(f"{base}/api/generate", "POST", {"run": "dc", "class_label": k, "steps": 60, "seed": k, "batch": 8})[
                "id"
            ]
            for k in range(5)
        ]
        cancelled = api(f"{base}/api/jobs/{ids[2]}/cancel", "POST")
        assert cancelled["status"] in ("cancelled", "running")
        jobs = [wait(base, i) for i in ids]
        assert [j["status"] for j in jobs] == ["done", "done", "cancelled", "done", "done"]
        done = [j for j in jobs if j["status"] == "done"]
        assert [j["started"] for j in done] == sorted(j["started"] for j in done)  # first in, first out
        assert api(f"{base}/api/jobs/{ids[0]}/cancel", "POST", expect=409)
        # a running job stops at its next step
        long = api(f"{base}/api/generate", "POST", {"run": "dc", "steps": 200, "seed": 0, "batch": 16})["id"]
        running(base, long)
        api(f"{base}/api/jobs/{long}/cancel", "POST")
        job = wait(base, long)
        assert job["status"] == "cancelled" and job["step"] < 200 and job["images"] == 0


def test_chain_positions(digits_studio):
    with served(digits_studio) as base:
        job = wait(base, api(f"{base}/api/chain", "POST", {"run": "dc", "class_label": 4, "steps": 8, "seed": 1})["id"])
        assert job["status"] == "done" and job["chain"]["positions"] == 9
        t = job["chain"]["t"]
        assert t[0] > t[-1] == 0
        first, last = (png_array(api(f"{base}/api/jobs/{job['id']}/chain/{k}/x_t.png")) for k in (0, 8))
        assert np.array_equal(last, png_array(api(f"{base}/api/jobs/{job['id']}/images/0.png")))
        assert not np.array_equal(first, last)
        assert api(f"{base}/api/jobs/{job['id']}/chain/9/x0.png", expect=404)


WRONG = {  # per field of a generate request, values it must refuse (on the class-conditional digits run)
    "run": ["..", "../dc", "dc/../../etc", "nope", "clf", "a" * 300, ".studio", "", 3, None, ["dc"]],
    "prompt": [123, [], {}, "x" * 5000, "a prompt (dc takes none)"],
    "negative_prompt": ["no text run", 7, "x" * 5000],
    "class_label": [-1, 10, 10**9, "x", 1.5, [3]],
    "guidance": [-1, 1e9, "x", [], "nan", 1e308 * 10],
    "interval": [[0.5], "x", [1, 2, 3], [0.9, 0.1], {}],
    "rescale": [-1, 2, "x"],
    "sampler": ["magic", 3, "../x", ""],
    "spacing": ["magic", 3, "../x"],
    "steps": [0, -1, 10**12, "x", 201, 1.5, None],
    "eta": [-1, "x", 0.5],  # dpmpp-2m takes no eta
    "seed": [-1, 2**31, 2**63, "x", 1.5],
    "batch": [0, 17, 10**9, "x", -3],
    "method": ["replace"],
    "image": ["x"],
    "extra": [1],  # fields a generate does not take
}


def bad_requests(rng: random.Random, base: str, png: bytes) -> list[tuple]:
    """Random and malformed requests: wrong types, huge numbers, bad JSON, bad images, path traversal in names."""
    names = ["..", "../dc", "%2e%2e", "dc/../../etc", "nope", "a" * 300, "dc%00", ".studio", "dc\\x", "clf", ""]
    out = []
    for _ in range(300):
        kind = rng.randrange(8)
        if kind == 0:  # a generate with one field wrong
            field = rng.choice(list(WRONG))
            out.append(
                ("POST", "/api/generate", {"run": "dc", "steps": 4, "seed": 0, field: rng.choice(WRONG[field])}, None)
            )
        elif kind == 1:  # bad JSON / not JSON
            out.append(
                (
                    "POST",
                    rng.choice(["/api/generate", "/api/chain", "/api/inpaint"]),
                    None,
                    rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"run": ', b"1e999999", b""]),
                )
            )
        elif kind == 2:  # names with path components
            out.append(
                (
                    "GET",
                    rng.choice(["/api/runs/{}", "/api/runs/{}/pictures/loss.png", "/api/runs/dc/pictures/{}"]).format(
                        rng.choice(names[:-2])
                    ),
                    None,
                    None,
                )
            )
        elif kind == 3:  # job ids that are not
            out.append(
                (
                    rng.choice(["GET", "POST"]),
                    rng.choice(
                        [
                            "/api/jobs/{}",
                            "/api/jobs/{}/cancel",
                            "/api/jobs/{}/preview.png",
                            "/api/jobs/{}/images/0.png",
                            "/api/jobs/{}/chain/0/x0.png",
                        ]
                    ).format(rng.choice(["../../x", "0" * 16, "zz", "0123456789abcdef0", "%2e%2e"])),
                    None,
                    None,
                )
            )
        elif kind == 4:  # inpainting with bad images and masks
            good = base64.b64encode(png).decode()
            image = rng.choice(
                [good, "not base64!", base64.b64encode(b"GIF89a").decode(), "data:image/png;base64," + good, ""]
            )
            mask = rng.choice(
                [
                    good,
                    base64.b64encode(pngs.encode(torch.zeros(1, 3, 3, dtype=torch.uint8))).decode(),
                    base64.b64encode(pngs.encode(torch.zeros(1, 8, 8, dtype=torch.uint8))).decode(),
                    "%%%",
                ]
            )
            out.append(
                (
                    "POST",
                    "/api/inpaint",
                    {
                        "run": rng.choice(["dc", "clf", "..", "nope"]),
                        "image": image,
                        "mask": mask,
                        "method": rng.choice(["replace", "ddrm", "magic", 3]),
                        "steps": rng.choice([4, 0, 10**9]),
                    },
                    None,
                )
            )
        elif kind == 5:  # uploads that are not studio PNGs
            out.append(
                (
                    "POST",
                    "/api/parameters",
                    None,
                    rng.choice([b"", b"junk", pngs.encode(torch.zeros(1, 4, 4, dtype=torch.uint8))]),
                )
            )
        elif kind == 6:  # history queries out of range
            out.append(
                (
                    "GET",
                    f"/api/history?limit={rng.choice([-1, 0, 10**9, 'x'])}&offset={rng.choice([-5, 'y', 10**12])}"
                    f"&status={rng.choice(['done', 'x', ''])}",
                    None,
                    None,
                )
            )
        else:  # unknown routes and methods
            out.append(
                (
                    rng.choice(["PUT", "DELETE", "PATCH"]),
                    rng.choice(["/api/generate", "/api/runs", "/api/jobs/0000000000000000"]),
                    None,
                    None,
                )
            )
    return out


def test_fuzz_bad_requests_answer_4xx_and_touch_nothing(digits_studio):
    png = pngs.encode(torch.zeros(1, 8, 8, dtype=torch.uint8))
    rng = random.Random(0)
    with served(digits_studio, token="tok") as base:
        api(f"{base}/api/runs?token=tok")  # the studio's folder is made at start; from here nothing may change
        before = snapshot(digits_studio)
        requests = bad_requests(rng, base, png)
        counts: dict[int, int] = {}
        for method, path, body, raw in requests:
            status, data, _ = (
                call(
                    base + path,
                    method,
                    body,
                    raw=raw,
                    headers={"Authorization": "Bearer tok"},
                    files={"file": raw} if path == "/api/parameters" else None,
                )
                if path == "/api/parameters"
                else call(
                    base + path,
                    method,
                    body,
                    raw=raw,
                    headers={
                        "Authorization": "Bearer tok",
                        **({"Content-Type": "application/json"} if raw is not None else {}),
                    },
                )
            )
            counts[status] = counts.get(status, 0) + 1
            assert 400 <= status < 500 or (status == 200 and path.startswith("/api/history")), (
                method,
                path,
                body,
                status,
                data[:200],
            )
            assert "Traceback" not in data.decode(errors="replace")
            if status >= 400 and status != 405:
                assert "error" in json.loads(data), (path, data[:200])
        missing = sum(call(base + p, m)[0] == 401 for m, p, _, _ in requests[:50])  # and without the token: 401
        assert missing == 50
        assert api(f"{base}/api/history?status=any&token=tok")["jobs"] == []
        after = snapshot(digits_studio)
    assert before == after
    print(f"\nfuzz: {len(requests)} requests, statuses {dict(sorted(counts.items()))}, 50 without the token: 401")


def test_load_50_concurrent_requests(digits_studio):
    limits = Limits(max_queue=10)
    body = {"run": "dc", "class_label": 1, "steps": 20, "seed": 0, "batch": 4}
    with served(digits_studio, limits=limits) as base:
        api(f"{base}/api/runs")
        wait(base, api(f"{base}/api/generate", "POST", body)["id"])  # the run loaded and one job run: memory at rest
        rss = resident_mib()
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda i: call(f"{base}/api/generate", "POST", {**body, "seed": i}), range(50)))
        statuses = [a[0] for a in answers]
        accepted = [json.loads(a[1])["id"] for a in answers if a[0] == 200]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0
        assert 10 <= len(accepted) <= 11  # the queue's 10, and one more when the worker took a job meanwhile
        assert all(wait(base, i)["status"] == "done" for i in accepted)  # none lost
        assert len(api(f"{base}/api/history?limit=100")["jobs"]) == len(accepted) + 1
        assert len(api(f"{base}/api/jobs")["jobs"]) <= 64  # memory: a bounded number of jobs is kept
        grown = resident_mib() - rss
        assert grown < 200
    print(
        f"\nload: 50 concurrent requests, {len(accepted)} accepted, {statuses.count(429)} refused with 429, all "
        "accepted done; "
        f"resident memory {rss:.0f} MiB before, {grown:+.0f} MiB after"
    )


def test_restart_keeps_history_and_interrupts(digits_studio):
    with served(digits_studio) as base:
        done = wait(base, api(f"{base}/api/generate", "POST", {"run": "dc", "steps": 4, "seed": 0})["id"])
        long = api(f"{base}/api/generate", "POST", {"run": "dc", "steps": 200, "seed": 0, "batch": 16})["id"]
        queued = api(f"{base}/api/generate", "POST", {"run": "dc", "steps": 200, "seed": 1, "batch": 16})["id"]
    with served(digits_studio) as base:
        assert [j["id"] for j in api(f"{base}/api/history")["jobs"]] == [done["id"]]
        assert api(f"{base}/api/jobs/{long}")["status"] in ("interrupted", "done")
        assert api(f"{base}/api/jobs/{queued}")["status"] == "interrupted"
        assert api(f"{base}/api/jobs/{done['id']}/images/0.png")[:4] == b"\x89PNG"


def test_cli_refuses_bad_options(tmp_path, capsys):
    from difflab.cli import main

    assert main(["studio", "--runs", str(tmp_path / "missing")]) == 2
    assert main(["studio", "--runs", str(tmp_path), "--port", "70000"]) == 2
    assert main(["studio", "--runs", str(tmp_path), "--preview-every", "-1"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "--port" in err and "--preview-every" in err
    assert not (tmp_path / ".studio").exists()


def test_img2img_interpolate_sweep_forward(digits_studio):
    from difflab.data.images import load_images

    digits = load_images("digits", split="test").images
    b64 = [base64.b64encode(pngs.encode(d)).decode() for d in digits[:2]]
    run = difflab.load(digits_studio / "dc")
    with served(digits_studio) as base:

        def done(path, body):
            job = wait(base, api(f"{base}{path}", "POST", body)["id"])
            assert job["status"] == "done", job
            return job

        job = done(
            "/api/img2img", {"run": "dc", "image": b64[0], "strength": 0.5, "steps": 10, "seed": 2, "class_label": 0}
        )
        direct = to_uint8(run.img2img(to_model(digits[:1]), 0.5, steps=10, seed=2, class_label=0))[0].numpy()
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/0.png")), direct)
        job = done(
            "/api/interpolate", {"run": "dc", "image": b64[0], "image_b": b64[1], "frames": 4, "steps": 10, "seed": 0}
        )
        assert job["images"] == 4
        job = done("/api/sweep", {"run": "dc", "scales": [1, 3], "class_label": 3, "steps": 10, "seed": 4})
        for i, scale in enumerate((1, 3)):  # each the same seed at its own scale
            direct = to_uint8(run.sample(1, class_label=3, guidance=scale, steps=10, seed=4))[0].numpy()
            assert np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/{i}.png")), direct)
        job = done("/api/forward", {"run": "dc", "image": b64[0], "steps": 10, "seed": 0})
        assert job["chain"]["positions"] == 11 and job["chain"]["t"][-1] == 0
        assert np.array_equal(
            png_array(api(f"{base}/api/jobs/{job['id']}/chain/10/x_t.png")), digits[0].numpy()
        )  # t = 0: the image
        assert api(f"{base}/api/img2img", "POST", {"run": "dc", "image": b64[0], "strength": 0}, expect=422)
        cut = base64.b64encode(pngs.encode(digits[0])[:50]).decode()  # a PNG cut inside its pixel data
        assert "image" in api(f"{base}/api/forward", "POST", {"run": "dc", "image": cut}, expect=400)["error"]
        small = base64.b64encode(pngs.encode(digits[0][:, :4, :4])).decode()
        assert (
            "takes 8x8"
            in api(f"{base}/api/interpolate", "POST", {"run": "dc", "image": b64[0], "image_b": small}, expect=400)[
                "error"
            ]
        )


def test_upscale_with_a_super_resolution_run(tmp_path, digits_runs):
    from difflab.data.images import load_images
    from difflab.runs.data import low_res_of
    from difflab.runs.diffusion import load_upscaler

    root = runs_folder(tmp_path, dc=digits_runs / "dc", sr=digits_runs / "sr")
    digit = load_images("digits", split="test").images[:1]  # uint8 (1, 1, 8, 8)
    low = to_uint8(low_res_of(digit, 2))  # (1, 1, 4, 4): what the user uploads
    b64, full = (base64.b64encode(pngs.encode(x[0])).decode() for x in (low, digit))
    sr = load_upscaler(root / "sr")
    with served(root) as base:
        runs = {r["name"]: r for r in api(f"{base}/api/runs")["runs"]}
        assert runs["sr"]["super_resolution"] and runs["sr"]["factor"] == 2 and not runs["sr"]["generates"]
        body = {"run": "sr", "image": b64, "noise_level": 0.1, "sampler": "ddim", "steps": 10, "seed": 3}
        job = wait(base, api(f"{base}/api/upscale", "POST", body)["id"])
        assert job["status"] == "done" and job["kind"] == "upscale" and job["images"] == 1
        png = api(f"{base}/api/jobs/{job['id']}/images/0.png")
        direct = to_uint8(sr.upscale(to_model(low), noise_level=0.1, sampler="ddim", steps=10, seed=3))[0].numpy()
        assert png_array(png).shape == (1, 8, 8) and np.array_equal(png_array(png), direct)  # the library's upscaling
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/input.png")), low[0].numpy())
        back = api(
            f"{base}/api/parameters", "POST", files={"file": png}
        )  # its PNG holds its settings, like every job's
        assert back["same_weights"] and {k: back["settings"][k] for k in body if k != "image"} == {
            k: v for k, v in body.items() if k != "image"
        }
        assert back["settings"]["kind"] == "upscale"
        assert [j["id"] for j in api(f"{base}/api/history?limit=1")["jobs"]] == [job["id"]]
        # refused in one line: a run that is not an SR run, an image of the wrong size, an SR run for another job
        assert (
            "not a super-resolution run"
            in api(f"{base}/api/upscale", "POST", {"run": "dc", "image": b64}, expect=400)["error"]
        )
        assert (
            "is 8x8; sr upscales 4x4 images (factor 2) to 8x8"
            in api(f"{base}/api/upscale", "POST", {"run": "sr", "image": full}, expect=400)["error"]
        )
        assert (
            "super-resolution run"
            in api(f"{base}/api/generate", "POST", {"run": "sr", "steps": 4}, expect=400)["error"]
        )
        assert (
            "super-resolution run"
            in api(f"{base}/api/img2img", "POST", {"run": "sr", "image": full}, expect=400)["error"]
        )
        assert "sampler" in api(f"{base}/api/upscale", "POST", {**body, "sampler": "magic"}, expect=400)["error"]
        assert api(f"{base}/api/upscale", "POST", {**body, "noise_level": 2}, expect=422)
        assert api(
            f"{base}/api/upscale", "POST", {**body, "class_label": 3}, expect=422
        )  # it takes no condition but the image


def test_text_run_prompts_and_lora(tmp_path, text_runs, digits_runs):
    root = runs_folder(tmp_path, minilm=text_runs / "minilm", lora=text_runs / "lora", dc=digits_runs / "dc")
    settings = {"run": "minilm", "prompt": "a handwritten sks three", "steps": 8, "seed": 1, "batch": 2}
    with served(root) as base:
        runs = {r["name"]: r for r in api(f"{base}/api/runs")["runs"]}
        assert runs["minilm"]["text"] and runs["lora"]["adapter"] and not runs["minilm"]["adapter"]
        # each run offers the adapters trained over its weights alone: the digits run none of the text run's
        assert runs["lora"]["adapter_base"] == difflab.load(root / "minilm").fingerprint
        assert runs["minilm"]["adapters"] == ["lora"] and runs["dc"]["adapters"] == []
        assert (
            "was trained over"
            in api(f"{base}/api/generate", "POST", {"run": "dc", "steps": 4, "lora": [["lora", 1.0]]}, expect=400)[
                "error"
            ]
        )
        plain = wait(base, api(f"{base}/api/generate", "POST", settings)["id"])
        adapted = wait(base, api(f"{base}/api/generate", "POST", {**settings, "lora": [["lora", 1.0]]})["id"])
        assert plain["status"] == adapted["status"] == "done"
        png = api(f"{base}/api/jobs/{adapted['id']}/images/1.png")
        assert pngs.decode(png)[1]["lora"] == [["lora", 1.0]]
        direct = difflab.load(root / "minilm", lora=[(root / "lora", 1.0)]).sample(
            2, prompt=settings["prompt"], steps=8, seed=1
        )
        assert np.array_equal(png_array(png), to_uint8(direct)[1].numpy())
        # (the shared adapter trained 4 steps: it moves the samples by ~1e-5, below one 8-bit level, so the plain
        # run's pixels cannot tell the two apart; equality with the library's adapted run is the check)
        assert (
            "characters"
            in api(f"{base}/api/generate", "POST", {**settings, "prompt": "three " * 300}, expect=400)["error"]
        )
        assert (
            "tokens" in api(f"{base}/api/generate", "POST", {**settings, "prompt": "3," * 199}, expect=400)["error"]
        )  # the encoder's limit
        assert api(f"{base}/api/generate", "POST", {**settings, "lora": [["../lora", 1.0]]}, expect=404)
        assert api(f"{base}/api/generate", "POST", {**settings, "lora": [["lora", 9.0]]}, expect=400)
        assert api(f"{base}/api/generate", "POST", {**settings, "class_label": 3}, expect=400)
        assert [j["id"] for j in api(f"{base}/api/history?q=SKS")["jobs"]] == [adapted["id"], plain["id"]]


def test_a_distilled_student_generates_with_its_own_sampler(digits_studio):
    """A student in the runs folder: a job that names no sampler gets the student's own (consistency, 1 step) and
    the library's pixels; a job that names another sampler is a 400 in one line (the student's own refusal)."""
    from difflab.distill.student import distill

    distill(digits_studio / "dc", digits_studio / "fast", "consistency", guidance_range=(1, 3), steps=3, progress=False)
    student = difflab.load(digits_studio / "fast")
    with served(digits_studio) as base:
        runs = {r["name"]: r for r in api(f"{base}/api/runs")["runs"]}
        assert runs["fast"]["kind"] == "distilled" and runs["fast"]["generates"]  # on the page's run menu
        # the run's info says the sampler and steps a job naming none gets (the page's menu shows them)
        assert api(f"{base}/api/runs/fast")["sampling"] == {"sampler": "consistency", "steps": 1}
        assert api(f"{base}/api/runs/dc")["sampling"] == {"sampler": "dpmpp-2m", "steps": 20}
        assert api(f"{base}/api/runs/clf")["sampling"] is None
        job = wait(
            base, api(f"{base}/api/generate", "POST", {"run": "fast", "class_label": 4, "guidance": 2, "seed": 3})["id"]
        )
        assert job["status"] == "done", job
        assert (job["settings"]["sampler"], job["settings"]["steps"]) == ("consistency", 1)
        direct = to_uint8(student.sample(1, class_label=4, guidance=2, seed=3)).numpy()
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/0.png")), direct[0])
        status, data, _ = call(
            f"{base}/api/generate", "POST", {"run": "fast", "class_label": 4, "sampler": "dpmpp-2m", "seed": 3}
        )
        if status == 200:  # refused when the job runs: the job records the one-line error
            failed = wait(base, json.loads(data)["id"])
            assert failed["status"] == "failed" and "samples with 'consistency', not 'dpmpp-2m'" in failed["error"], (
                failed
            )
        else:
            assert status == 400 and b"samples with 'consistency', not 'dpmpp-2m'" in data, data


def test_interpolate_and_upscale_preview_and_cancel(tmp_path, digits_runs):
    """Interpolation and upscaling run through the library's callback: a preview arrives before the result (the
    events stream shows a running state with one before the done state), the step count reaches the job's steps,
    the pixels are the library's without a callback, and a running job cancelled stops before its last step."""
    from difflab.data.images import load_images
    from difflab.runs.data import low_res_of

    root = runs_folder(tmp_path, dc=digits_runs / "dc", sr=digits_runs / "sr")
    digits = load_images("digits", split="test").images[:2]
    b64 = [base64.b64encode(pngs.encode(d)).decode() for d in digits]
    low = to_uint8(low_res_of(digits[:1], 2))
    run, sr = difflab.load(root / "dc"), difflab.load(root / "sr")
    jobs = {
        "ddim": (
            "/api/interpolate",
            {"run": "dc", "image": b64[0], "image_b": b64[1], "frames": 3, "steps": 10, "seed": 1, "class_label": 2},
            lambda: run.interpolate(to_model(digits[:1]), to_model(digits[1:]), 3, steps=10, seed=1, class_label=2),
        ),
        "ddpm": (
            "/api/interpolate",
            {"run": "dc", "image": b64[0], "image_b": b64[1], "frames": 2, "steps": 10, "seed": 1, "method": "ddpm"},
            lambda: run.interpolate(to_model(digits[:1]), to_model(digits[1:]), 2, method="ddpm", steps=10, seed=1),
        ),
        "upscale": (
            "/api/upscale",
            {"run": "sr", "image": base64.b64encode(pngs.encode(low[0])).decode(), "steps": 10, "seed": 2},
            lambda: sr.upscale(to_model(low), steps=10, seed=2),
        ),
    }
    with served(root, limits=Limits(preview_every=2)) as base:
        for name, (path, body, direct) in jobs.items():
            id = api(base + path, "POST", body)["id"]
            states = events(base, id)
            assert states[-1]["status"] == "done", (name, states[-1])
            assert any(s["status"] == "running" and s["previews"] > 0 for s in states[:-1]), (
                name
            )  # a preview before the result
            assert states[-1]["step"] == states[-1]["steps"], (
                name,
                states[-1],
            )  # 2 x 10 for ddim: inversion, then decoding
            expected = to_uint8(direct()).numpy()
            assert all(
                np.array_equal(png_array(api(f"{base}/api/jobs/{id}/images/{i}.png")), expected[i])
                for i in range(len(expected))
            ), name
        assert api(f"{base}/api/jobs/{id}/preview.png")[:4] == b"\x89PNG"

        long = {
            "/api/interpolate": {**jobs["ddim"][1], "frames": 16, "steps": 200},
            "/api/upscale": {**jobs["upscale"][1], "steps": 200},
        }
        for path, body in long.items():
            id = api(base + path, "POST", body)["id"]
            running(base, id)
            api(f"{base}/api/jobs/{id}/cancel", "POST")
            job = wait(base, id)
            assert job["status"] == "cancelled" and job["step"] < job["steps"] and job["images"] == 0, (path, job)
            assert api(f"{base}/api/jobs/{id}/images/0.png", expect=404)


def test_runs_panel_gets_the_eval_every_scores_beside_the_loss(tmp_path, digits_runs):
    """--eval-every's rows (FD, the best step, the memorisation ratio) reach the Runs panel apart from the loss
    curve, whose rows stay (step, loss) only."""
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    rows = [{"step": 10, "fd": 5.0, "nn_ratio": 1.2, "best_step": 10}, {"step": 20, "fd": 7.0, "best_step": 10}]
    with open(root / "dc" / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "fd": ')  # a line being written
    with served(root) as base:
        detail = api(f"{base}/api/runs/dc")
    assert detail["evals"] == [
        {"step": 10, "metric": "fd", "value": 5.0, "best_step": 10, "nn_ratio": 1.2},
        {"step": 20, "metric": "fd", "value": 7.0, "best_step": 10, "nn_ratio": None},
    ]
    assert all(set(r) == {"step", "loss"} for r in detail["metrics"])
