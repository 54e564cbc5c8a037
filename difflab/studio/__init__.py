"""difflab studio: a local web app over the run object (sample, guide, edit, watch the chain), and its JSON API.

    difflab studio --runs runs/              # http://127.0.0.1:7860, the API's OpenAPI page at /docs
    from difflab.studio.app import create_app
    app = create_app("runs/")                # an ASGI app (FastAPI), e.g. for uvicorn or a test client

The parts, one module per idea:

    folder.py    the runs a studio serves: names checked (no path components), summaries, metrics
    pngs.py      PNGs whose ``parameters`` text chunk holds every setting of the image (AUTOMATIC1111's convention)
    history.py   the jobs in SQLite (RUNS/.studio/history.sqlite): every setting, searchable by prompt
    events.py    a job's states in order, each as it happens, drained by its events stream (none can be missed)
    jobs.py      the job record and its states, the limits, the table of job kinds and the checks they share
    kinds.py     one handler per job kind (generate, chain, inpaint, img2img, interpolate, sweep, forward, upscale):
                 its request, its checks, its run
    queue.py     the queue: one worker thread, FIFO, cancel, previews, an LRU of loaded runs
    app.py       the HTTP layer in route groups: the token and 4xx JSON errors, the page, runs, jobs (a route per
                 kind of the table), history; static/ holds the page (plain HTML/JS/CSS)

Nothing is read or written outside the runs folder, except the shipped models (read-only) listed beside its runs."""
