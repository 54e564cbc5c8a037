"""difflab studio's page in a real browser: Debian's chromium driven by Playwright for Python, against a real
server on a free port (tests/test_studio.py's ``served``).

Skipped, saying so, where playwright or chromium is missing (`make test` installs both). With
``STUDIO_SCREENSHOTS=docs/img`` the tests save a screenshot of each panel there (docs/img/studio-*.png)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install 'difflab[test]')"
)

from test_studio import api, png_array, runs_folder, served, wait

import difflab
from difflab.data.images import load_images, to_uint8
from difflab.runs import shipped
from difflab.runs.data import low_res_of
from difflab.studio import pngs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    context.set_default_timeout(90_000)  # the machine may be busy with trainings: slow is not wrong
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught exception in the page


def screenshot(page, name: str) -> None:
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"studio-{name}.png"), full_page=True)


def open_studio(page, base: str, run: str) -> None:
    page.goto(base + "/")
    page.wait_for_function("document.querySelectorAll('#run-select option').length > 0")
    page.select_option("#run-select", run)


def log(page) -> list[str]:
    return page.evaluate("window.studioLog")


def wait_log(page, prefix: str, count: int = 1, timeout: float = 60_000) -> str:
    """The page's count-th log line starting with prefix (a job it showed), or a failure saying the page's error."""
    page.wait_for_function(
        f"window.studioLog.filter(s => s.startsWith({json.dumps(prefix)})).length >= {count}"
        " || !document.getElementById('error').hidden",
        timeout=timeout,
    )
    shown = [s for s in log(page) if s.startswith(prefix)]
    assert len(shown) >= count, f"the page says: {page.text_content('#error')}"
    return shown[count - 1]


def images_loaded(page, selector: str) -> None:
    page.wait_for_function(
        f"[...document.querySelectorAll({json.dumps(selector)})].every(i => i.complete && i.naturalWidth > 0)"
    )


def broken_images(page) -> list[str]:
    """The ids of the visible <img> elements without a picture (a browser draws a broken-image placeholder)."""
    return page.evaluate(
        "[...document.images].filter(i => i.offsetParent !== null && !(i.getAttribute('src') || '')).map(i => i.id)"
    )


def test_a_newcomer_sees_the_shipped_models(page, tmp_path):
    """An empty runs folder, as a newcomer's: no panel shows a broken picture; the shipped text model comes with
    the guidance it was measured best at (its recipe's scale, 5), and its row on the Runs page shows its card: the
    figures and the commands of its recipe."""
    root = tmp_path / "runs"
    root.mkdir()
    with served(root) as base:
        open_studio(page, base, "fashion-pairs-t2i")
        assert wait_log(page, "own guidance fashion-pairs-t2i") == "own guidance fashion-pairs-t2i 5"
        assert page.input_value("#guidance") == "5"
        for panel in ("generate", "edit", "chain", "history", "runs"):
            page.click(f"nav button[data-panel={panel}]")
            assert broken_images(page) == [], panel
        page.click("#runs-table tr[data-run=fashion-pairs-t2i]")
        wait_log(page, "card ")
        page.wait_for_selector("#run-card:not([hidden])")
        figures = page.locator("#card-figures tbody tr").all_inner_texts()
        assert len(figures) == len(shipped.recipe("fashion-pairs-t2i")["figures"]) and any(
            "held_out" in f for f in figures
        )
        assert "difflab train fashion-pairs" in page.text_content("#card-commands")
        assert "[object Object]" not in " ".join(figures)  # a table of figures (by_phrasing) reads as its entries
        steps = shipped.recipe("fashion-pairs-t2i").get("stage_steps")
        assert not steps or page.text_content("#card-steps").startswith(" + ".join(map(str, steps)) + " steps")
        assert broken_images(page) == []
        screenshot(page, "runs-shipped")
        page.click("#runs-table tr[data-run=fashion-pairs-ae]")  # no images of its own: its card alone
        page.wait_for_function("document.getElementById('card-what').textContent.includes('autoencoder')")
        assert page.input_value("#run-select") == "fashion-pairs-t2i" and broken_images(page) == []


def test_generate_preview_history_and_png_round_trip(page, tmp_path, text_runs):
    root = runs_folder(tmp_path, minilm=text_runs / "minilm")
    with served(root) as base:
        open_studio(page, base, "minilm")
        page.fill("#prompt", "a handwritten three")
        page.fill("#steps", "150")
        page.fill("#batch", "8")
        page.click("#generate")
        final = wait_log(page, "final ")
        job = final.split()[1]
        shown = log(page)
        first_preview = next(i for i, s in enumerate(shown) if s.startswith(f"preview {job}"))
        assert first_preview < shown.index(final)  # the live preview came before the final image
        images_loaded(page, "#result, #results img")
        screenshot(page, "generate")

        page.click("nav button[data-panel=history]")
        page.wait_for_selector(f".history-item[data-id='{job}'] img.thumb")
        images_loaded(page, ".history-item img")
        page.fill("#history-search", "three")
        page.wait_for_selector(f".history-item[data-id='{job}']")
        screenshot(page, "history")

        # drop image 2 back in: its settings (seed + 2, batch 1) make the same pixels
        png = api(f"{base}/api/jobs/{job}/images/2.png")
        page.set_input_files("#param-file", files=[{"name": "dropped.png", "mimeType": "image/png", "buffer": png}])
        wait_log(page, "parameters restored")
        assert page.input_value("#batch") == "1" and page.input_value("#prompt") == "a handwritten three"
        assert int(page.input_value("#seed")) == api(f"{base}/api/jobs/{job}")["settings"]["seed"] + 2
        page.click("#generate")
        again = wait_log(page, "final ", 2).split()[1]
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{again}/images/0.png")), png_array(png))

        page.reload()  # the last result shown comes back
        assert wait_log(page, "restored ") == f"restored {again}"
        images_loaded(page, "#result, #results img")
        assert f"/api/jobs/{again}/images/grid.png" in page.get_attribute("#result", "src")
        assert page.locator("#results img").count() == 1


def test_mask_painted_with_the_mouse_inpaints(page, tmp_path, digits_runs):
    root = runs_folder(tmp_path, dc=digits_runs / "dc", sr=digits_runs / "sr")
    digit = load_images("digits", split="test").images[3]  # uint8 (1, 8, 8)
    (tmp_path / "digit.png").write_bytes(pngs.encode(digit))
    with served(root) as base:
        open_studio(page, base, "dc")
        page.click("nav button[data-panel=edit]")
        page.set_input_files("#edit-file", str(tmp_path / "digit.png"))
        page.wait_for_function(
            "document.getElementById('edit-image').getContext('2d').getImageData(0, 0, 256, 256).data.some(v => v > 0)"
        )
        box = page.locator("#edit-mask").bounding_box()
        page.mouse.move(box["x"] + 140, box["y"] + 40)
        page.mouse.down()
        for k in range(1, 11):  # a stroke down the right half
            page.mouse.move(box["x"] + 150 + 4 * k, box["y"] + 40 + 17 * k)
        page.mouse.up()
        page.select_option("#method", "replace")
        page.fill("#edit-steps", "20")
        page.click("#inpaint")
        job = wait_log(page, "inpainted ").split()[1]
        images_loaded(page, "#edit-result")
        screenshot(page, "edit")
        mask = (
            pngs.decode(base64.b64decode(page.evaluate("maskPng()").partition(",")[2]), 1)[0][0].numpy() >= 128
        )  # True: filled in
        assert 0 < mask.sum() < mask.size
        result = png_array(api(f"{base}/api/jobs/{job}/images/0.png"))
        assert np.array_equal(result[0][~mask], digit[0].numpy()[~mask])  # outside the mask, exactly the input
        assert api(f"{base}/api/jobs/{job}")["settings"]["mask_pixels"] == int(mask.sum())
        page.fill("#strength", "0.5")
        page.click("#img2img")
        job = wait_log(page, "img2img ").split()[1]
        assert api(f"{base}/api/jobs/{job}")["settings"]["strength"] == 0.5
        page.set_input_files("#edit-file-b", str(tmp_path / "digit.png"))
        page.fill("#frames", "3")
        page.click("#interpolate")
        job = wait_log(page, "interpolated ").split()[1]
        assert api(f"{base}/api/jobs/{job}")["images"] == 3
        shown = log(page)  # its live preview (every 5 of its 2 x 20 steps) came before its result
        assert shown.index(next(s for s in shown if s.startswith(f"edit preview {job}"))) < shown.index(
            f"interpolated {job}"
        )

        # super-resolution: the digit at 4x4, upscaled by the sr run (factor 2) with the page's sampler and seed
        (tmp_path / "low.png").write_bytes(pngs.encode(to_uint8(low_res_of(digit[None], 2))[0]))
        page.set_input_files("#edit-file", str(tmp_path / "low.png"))
        page.wait_for_function("edit.image && edit.image.naturalWidth === 4")
        page.select_option("#sr-run", "sr")
        page.fill("#noise-level", "0.1")
        page.click("#upscale")
        job = wait_log(page, "upscaled ").split()[1]
        images_loaded(page, "#edit-result")
        settings = api(f"{base}/api/jobs/{job}")["settings"]
        assert {k: settings[k] for k in ("run", "noise_level", "steps", "sampler")} == {
            "run": "sr",
            "noise_level": 0.1,
            "steps": 20,
            "sampler": "dpmpp-2m",
        }
        png = api(f"{base}/api/jobs/{job}/images/0.png")
        assert png_array(png).shape == (1, 8, 8)
        page.fill("#noise-level", "0")  # its PNG dropped back in restores the Edit panel's settings
        page.set_input_files("#param-file", files=[{"name": "upscaled.png", "mimeType": "image/png", "buffer": png}])
        wait_log(page, "parameters restored")
        assert (
            page.is_visible("#panel-edit")
            and page.input_value("#noise-level") == "0.1"
            and page.input_value("#sr-run") == "sr"
        )

        page.fill(
            "#edit-steps", "200"
        )  # a long upscaling, cancelled with the Edit panel's button once it shows a preview
        before = sum(s.startswith("edit preview ") for s in log(page))
        page.click("#upscale")
        job = wait_log(page, "edit preview ", before + 1).split()[2]
        page.click("#edit-cancel")
        assert wait_log(page, "cancelled ") == f"cancelled {job}"
        job = api(f"{base}/api/jobs/{job}")
        assert job["kind"] == "upscale" and job["status"] == "cancelled" and job["step"] < 200 and job["images"] == 0
        assert page.is_disabled("#edit-cancel") and page.is_hidden("#error")


def test_queue_five_cancel_the_third(page, tmp_path, digits_runs):
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    with served(root) as base:
        open_studio(page, base, "dc")
        page.select_option("#class_label", "5")
        page.fill("#steps", "100")
        page.fill("#batch", "16")
        for seed in range(5):
            page.fill("#seed", str(seed))
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('#queue li').length >= {seed + 1}")
        page.click("#queue li:nth-child(3) button.cancel")
        page.wait_for_selector("#queue li:nth-child(3).cancelled")
        screenshot(page, "queue")
        ids = [j["id"] for j in api(f"{base}/api/jobs")["jobs"]]
        assert len(ids) == 5
        jobs = [wait(base, i) for i in ids]  # each job's events stream followed to its end
        assert [j["status"] for j in jobs] == ["done", "done", "cancelled", "done", "done"]
        assert [j["settings"]["seed"] for j in jobs] == [0, 1, 2, 3, 4]  # none lost, in order
        done = [j for j in jobs if j["status"] == "done"]
        assert [j["finished"] for j in done] == sorted(j["finished"] for j in done)


def test_chain_explorer_slider(page, tmp_path, digits_runs):
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    with served(root) as base:
        open_studio(page, base, "dc")
        page.select_option("#class_label", "2")
        page.fill("#steps", "10")
        page.click("nav button[data-panel=chain]")
        page.click("#chain-run")
        wait_log(page, "chain ")
        assert page.is_enabled("#chain-slider")
        assert page.get_attribute("#chain-slider", "max") == "10"
        seen = []
        for k in (0, 5, 10):
            page.fill("#chain-slider", str(k))
            page.wait_for_function(f"document.getElementById('chain-xt').src.includes('/chain/{k}/')")
            images_loaded(page, "#chain-xt, #chain-x0")
            assert page.text_content("#chain-t").startswith(f"step {k} of 10")
            seen.append(
                page.evaluate("""() => {
                const c = document.createElement('canvas'), i = document.getElementById('chain-xt');
                c.width = i.naturalWidth; c.height = i.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(i, 0, 0);
                return Array.from(g.getImageData(0, 0, c.width, c.height).data); }""")
            )
        assert seen[0] != seen[2]  # noise at the start, the sample at the end

        page.fill("#sweep-scales", "1, 3")
        page.click("#sweep-run")
        job = wait_log(page, "sweep ").split()[1]
        images_loaded(page, "#sweep-result")
        assert api(f"{base}/api/jobs/{job}")["settings"]["scales"] == [1, 3]
        page.fill("#chain-slider", "4")  # half way: x_t still noisy, the prediction already a digit
        page.wait_for_function("document.getElementById('chain-xt').src.includes('/chain/4/')")
        images_loaded(page, "#chain-xt, #chain-x0")
        screenshot(page, "chain")

        digit = load_images("digits", split="test").images[0]
        (tmp_path / "digit.png").write_bytes(pngs.encode(digit))
        page.set_input_files("#forward-file", str(tmp_path / "digit.png"))
        page.click("#forward-run")
        job = wait_log(page, "forward ").split()[1]
        assert page.text_content("#chain-x0-caption").startswith("the image")
        page.fill("#chain-slider", "10")
        page.wait_for_function(f"document.getElementById('chain-xt').src.includes('/{job}/chain/10/')")
        images_loaded(page, "#chain-xt")
        assert np.array_equal(
            png_array(api(f"{base}/api/jobs/{job}/chain/10/x_t.png")), digit.numpy()
        )  # t = 0: the image


def test_a_cut_event_stream_still_shows_the_job(page, tmp_path, digits_runs):
    """An events stream that stops before the job's end (here, the forward job's first one ends on a "running"
    state, as the server's once could) does not lose the job: the page asks for it and shows it when done."""
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    (tmp_path / "digit.png").write_bytes(pngs.encode(load_images("digits", split="test").images[0]))
    cut = []

    def events(route):
        if not cut:
            cut.append(route.request.url)
            route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body='data: {"status": "running"}\n\n'
            )
        else:
            route.continue_()

    with served(root) as base:
        open_studio(page, base, "dc")
        page.route("**/api/jobs/*/events", events)
        page.fill("#steps", "10")
        page.click("nav button[data-panel=chain]")
        page.set_input_files("#forward-file", str(tmp_path / "digit.png"))
        page.click("#forward-run")
        job = wait_log(page, "forward ").split()[1]
        assert cut == [f"{base}/api/jobs/{job}/events"]
        assert page.text_content("#chain-x0-caption").startswith("the image") and page.is_enabled("#chain-slider")


def test_lora_rows_up_to_four(page, tmp_path, text_runs, digits_runs):
    """The Generate panel takes up to 4 LoRA adapters (the API's limit), each with its strength; rows left at
    "(none)" are not sent, and "use these settings" brings the rows back. A run offers only the adapters trained
    over its weights: none on the digits run, the text run's two on the text run."""
    root = runs_folder(
        tmp_path,
        minilm=text_runs / "minilm",
        lora=text_runs / "lora",
        lora2=text_runs / "lora",  # two adapter runs
        dc=digits_runs / "dc",
    )
    with served(root) as base:
        open_studio(page, base, "dc")
        assert page.is_hidden("#lora-rows")
        page.select_option("#run-select", "minilm")
        assert page.is_visible("#lora-rows")
        rows = page.locator(".lora-row")
        assert rows.count() == 1
        assert rows.nth(0).locator(".lora option").all_inner_texts() == ["(none)", "lora", "lora2"]
        for _ in range(3):
            page.click("#lora-add")
        assert rows.count() == 4 and page.is_disabled("#lora-add")
        rows.nth(3).locator(".lora-remove").click()
        assert rows.count() == 3 and page.is_enabled("#lora-add")
        rows.nth(0).locator(".lora").select_option("lora")
        rows.nth(0).locator(".lora-strength").fill("0.5")
        rows.nth(2).locator(".lora").select_option("lora2")
        rows.nth(2).locator(".lora-strength").fill("-1.5")
        page.fill("#prompt", "a handwritten sks three")
        page.fill("#steps", "8")
        page.fill("#batch", "2")
        page.fill("#seed", "1")
        page.click("#generate")
        job = wait_log(page, "final ").split()[1]
        assert api(f"{base}/api/jobs/{job}")["settings"]["lora"] == [
            ["lora", 0.5],
            ["lora2", -1.5],
        ]  # the empty row left out
        run = difflab.load(root / "minilm", lora=[(root / "lora", 0.5), (root / "lora2", -1.5)])
        direct = run.sample(2, prompt="a handwritten sks three", guidance=1.0, sampler="dpmpp-2m", steps=8, seed=1)
        assert np.array_equal(png_array(api(f"{base}/api/jobs/{job}/images/1.png")), to_uint8(direct)[1].numpy())

        page.evaluate("setAdapters([])")
        page.click("nav button[data-panel=history]")
        page.click(f".history-item[data-id='{job}'] button.use")
        assert rows.count() == 2
        assert [
            (rows.nth(i).locator(".lora").input_value(), rows.nth(i).locator(".lora-strength").input_value())
            for i in range(2)
        ] == [("lora", "0.5"), ("lora2", "-1.5")]


def test_restart_keeps_history_in_the_page(page, tmp_path, digits_runs):
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    with served(root) as base:
        job = api(f"{base}/api/generate", "POST", {"run": "dc", "class_label": 8, "steps": 10, "seed": 3, "batch": 4})[
            "id"
        ]
        assert wait(base, job)["status"] == "done"
    with served(root) as base:
        open_studio(page, base, "dc")
        page.click("nav button[data-panel=runs]")
        page.click("#runs-table tr[data-run=dc]")
        images_loaded(page, "#run-samples")
        screenshot(page, "runs")
        page.click("nav button[data-panel=history]")
        page.wait_for_selector(f".history-item[data-id='{job}'] img.thumb")
        page.click(f".history-item[data-id='{job}'] button.use")
        assert (
            page.input_value("#seed") == "3"
            and page.input_value("#class_label") == "8"
            and page.input_value("#batch") == "4"
        )


def test_a_student_samples_with_its_own_sampler(page, tmp_path, digits_runs):
    """A distilled student chosen: the sampler menu shows its own sampler (from the run's info) and is fixed, the
    steps are its own, and Generate makes the library's student samples; the teacher chosen again offers every
    sampler from dpmpp-2m and 20 steps."""
    from difflab.distill.student import distill

    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    distill(root / "dc", root / "fast", "consistency", guidance_range=(1, 3), steps=3, progress=False)  # a few seconds
    with served(root) as base:
        open_studio(page, base, "fast")
        assert wait_log(page, "own sampling fast") == "own sampling fast consistency 1"
        assert page.is_disabled("#sampler") and page.is_disabled("#spacing")
        assert page.locator("#sampler option").all_inner_texts() == ["consistency (the run's own)"]
        assert page.input_value("#steps") == "" and page.get_attribute("#steps", "placeholder") == "1 (its own)"
        page.select_option("#class_label", "4")
        page.fill("#guidance", "2")
        page.fill("#seed", "3")
        page.fill("#batch", "2")
        page.click("#generate")
        job = api(f"{base}/api/jobs/{wait_log(page, 'final ').split()[1]}")
        assert (job["status"], job["settings"]["sampler"], job["settings"]["steps"]) == ("done", "consistency", 1)
        direct = to_uint8(difflab.load(root / "fast").sample(2, class_label=4, guidance=2, seed=3)).numpy()
        assert all(
            np.array_equal(png_array(api(f"{base}/api/jobs/{job['id']}/images/{i}.png")), direct[i]) for i in range(2)
        )

        page.select_option("#run-select", "dc")
        assert (
            page.is_enabled("#sampler")
            and page.input_value("#sampler") == "dpmpp-2m"
            and page.input_value("#steps") == "20"
        )
        page.select_option("#class_label", "4")  # the class menu is the chosen run's, built afresh
        page.fill("#steps", "4")
        page.click("#generate")
        job = api(f"{base}/api/jobs/{wait_log(page, 'final ', 2).split()[1]}")
        assert (job["status"], job["run"], job["settings"]["sampler"], job["settings"]["steps"]) == (
            "done",
            "dc",
            "dpmpp-2m",
            4,
        )


def test_runs_panel_draws_the_eval_every_scores_beside_the_loss(page, tmp_path, digits_runs):
    """A run trained with --eval-every: its Runs row shows the FD curve on the loss chart, the best step named."""
    root = runs_folder(tmp_path, dc=digits_runs / "dc")
    rows = [{"step": 10, "fd": 9.0, "best_step": 10}, {"step": 20, "fd": 4.0, "best_step": 20}]
    rows.append({"step": 30, "fd": 6.0, "best_step": 20})
    with open(root / "dc" / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with served(root) as base:
        open_studio(page, base, "dc")
        page.click("nav button[data-panel=runs]")
        page.click("#runs-table tr[data-run=dc]")
        assert wait_log(page, "evals ") == "evals 3 best 20"
        screenshot(page, "runs-eval-every")
