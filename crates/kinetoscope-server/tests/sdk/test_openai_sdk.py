"""`kinetoscope serve` driven by the official `openai` Python SDK, as a client of OpenAI's Videos API
would drive it after changing only its base URL; webhooks checked with the `standardwebhooks`
reference verifier and the SDK's own `webhooks.unwrap`; a `kill -9` mid-queue that loses no job;
`input_reference` (an upload and a data: URL) on a Wan 2.2 TI2V model; and on an image-to-video model with two
experts (Wan 2.2 I2V-A14B) `input_reference` uploaded with `last_image` and `guidance_scale_2` in `extra_body`.

With `--postgres ADMIN_URL` the same checks run against a deployment on PostgreSQL: each "server" is an API node
(`serve --no-worker`) and a worker process (`worker`) sharing a database of its own, and `kill -9` kills both.

Run by scripts/test-server-sdk.sh (which makes the virtual environment); by hand:
    python test_openai_sdk.py --binary target/debug/kinetoscope --model models/tiny/wan21-tiny-a \
        --ti2v-model models/tiny/wan22-ti2v-tiny-a --i2v-model models/tiny/wan22-i2v-a14b-tiny
"""

import argparse
import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings

import openai
import standardwebhooks

# The SDK marks the video methods deprecated (OpenAI's hosted Sora API); the API shape is what counts here.
warnings.filterwarnings("ignore", category=DeprecationWarning)

API_KEY = "sdk-test-key-0123456789"
SECRET = "whsec_" + base64.b64encode(b"kinetoscope-sdk-test-secret-32by").decode()
MODEL = "wan21-tiny-a"
checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(what)
    checks += 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver(http.server.BaseHTTPRequestHandler):
    """Webhook receiver: records every delivery."""

    deliveries = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Server:
    started = []
    # The database of each data folder (PostgreSQL runs): a restart finds its jobs again.
    databases = {}

    def __init__(self, args, data_dir, hook_port, model=None, size="48x32"):
        self.port = free_port()
        node = ["--model", model or args.model, "--model-name", MODEL, "--device", "cpu", "--data-dir", data_dir]
        command = [
            args.binary, "serve", *node, "--listen", f"127.0.0.1:{self.port}",
            "--default-size", size, "--default-seconds", "1", "--default-fps", "8", "--default-steps", "2",
            "--poll-after-ms", "100", "--max-queue", "8",
            "--webhook-url", f"http://127.0.0.1:{hook_port}/hooks/video",
            "--webhook-allowed-host", f"127.0.0.1:{hook_port}",
        ]
        env = dict(os.environ, KINETOSCOPE_API_KEYS=API_KEY, KINETOSCOPE_WEBHOOK_SECRET=SECRET, KINETOSCOPE_LOG="warn")
        self.worker = None
        if args.postgres:
            store = ["--store", Server.database(args.postgres, data_dir), "--lease-s", "2"]
            command += [*store, "--no-worker"]
            self.worker = subprocess.Popen([args.binary, "worker", *node, *store], env=env)
            Server.started.append(self.worker)
        self.process = subprocess.Popen(command, env=env)
        Server.started.append(self.process)
        self.wait_ready()
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=API_KEY, max_retries=0)

    @staticmethod
    def database(admin_url, data_dir):
        if data_dir not in Server.databases:
            name = f"kinetoscope_sdk_{len(Server.databases)}_{os.getpid()}"
            subprocess.run(["psql", admin_url, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
            Server.databases[data_dir] = admin_url.rsplit("/", 1)[0] + "/" + name
        return Server.databases[data_dir]

    def wait_ready(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("the server exited while starting")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    # An API node is ready once it read the store; its model is served once a worker loaded it.
                    if r.status == 200 and MODEL in json.load(r).get("served", [MODEL]):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server never became ready")

    def stop(self, sig=signal.SIGTERM):
        for process in [self.process, self.worker]:
            if process is not None:
                process.send_signal(sig)
        for process in [self.process, self.worker]:
            if process is not None:
                process.wait(timeout=60)


def poll(client, video_id):
    video = client.videos.poll(video_id, poll_interval_ms=50)
    check(video.status == "completed", f"{video_id} ended {video.status}: {video.error}")
    return video


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ti2v-model", required=True)
    parser.add_argument("--i2v-model", required=True)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose role may create databases")
    args = parser.parse_args()

    hook_port = free_port()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", hook_port), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()

    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(args, data_dir, hook_port)
        client = server.client

        # Create, poll, download.
        video = client.videos.create(prompt="a red fox in the snow", model=MODEL, seconds="1", size="48x32",
                                     extra_body={"seed": 3, "steps": 2})
        check(video.object == "video" and video.status in ("queued", "in_progress"), f"created: {video}")
        check(video.model == MODEL and video.size == "48x32" and video.seconds == "1", f"created: {video}")
        done = poll(client, video.id)
        check(done.progress == 100 and done.completed_at and done.expires_at, f"completed: {done}")
        mp4 = client.videos.download_content(video.id).read()
        check(mp4[4:8] == b"ftyp", "the download is an MP4")
        thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
        check(thumbnail.startswith(b"\x89PNG"), "the thumbnail is a PNG")

        # Remix: same settings, new prompt.
        remix = client.videos.remix(video.id, prompt="a blue fox in the snow")
        check(remix.remixed_from_video_id == video.id, f"remix: {remix}")
        poll(client, remix.id)

        # Listing pages through everything, newest first by default.
        listed = [v.id for v in client.videos.list(limit=1)]
        check(listed == [remix.id, video.id], f"listed {listed}")
        first_page = client.videos.list(limit=1, order="asc")
        check(first_page.data[0].id == video.id and first_page.has_more, "first page, ascending")

        # Edits: video-to-video by id, a time range of an uploaded file, an extension.
        # The SDK 3.57 checks `video` as a file on the client side, so a reference by id goes in extra_body
        # (it sends it as the multipart field `video[id]`, the shape the API defines).
        by_id = {"video": {"id": video.id}}
        edited = client.videos.edit(prompt="a fox at dusk", video=openai.omit, extra_body={**by_id, "strength": 0.5})
        poll(client, edited.id)
        redone = client.videos.edit(prompt="a fox in the rain", video=("clip.mp4", mp4, "video/mp4"),
                                    extra_body={"redo": "4-8"})
        poll(client, redone.id)
        extended = client.videos.extend(prompt="the fox runs off", seconds="1", video=openai.omit, extra_body=by_id)
        check(extended.seconds == "2.12", f"an extension's seconds are the whole clip's: {extended.seconds}")
        poll(client, extended.id)
        check(client.videos.download_content(extended.id).read()[4:8] == b"ftyp", "the extension is an MP4")
        # A region of the clip (the rectangle in extra_body, as a mask upload would be a file): every pixel outside it
        # kept, which the job's `result` reports.
        region = client.videos.edit(prompt="an owl on the fox's back", video=openai.omit,
                                    extra_body={**by_id, "region": "16,8,16,16"})
        poll(client, region.id)
        report = (client.videos.retrieve(region.id).model_extra or {}).get("result", {}).get("region", {})
        check(report.get("unmasked_max_abs") == 0.0, f"a region edit keeps every pixel outside it: {report}")
        edits = [edited.id, redone.id, extended.id, region.id]

        # Errors carry codes a client can branch on.
        try:
            client.videos.create(prompt="too big", size="4096x4096")
            check(False, "an oversized request was accepted")
        except openai.BadRequestError as e:
            check(e.code == "invalid_size" and e.param == "size", f"error {e.code} {e.param}")
        try:
            client.videos.create(prompt="x", model="sora-2")
            check(False, "an unknown model was accepted")
        except openai.BadRequestError as e:
            check(e.code == "model_not_found", f"error {e.code}")
        try:
            openai.OpenAI(base_url=client.base_url, api_key="wrong-key-0123456789", max_retries=0).videos.list()
            check(False, "a wrong key was accepted")
        except openai.AuthenticationError as e:
            check(e.code == "invalid_api_key", f"error {e.code}")

        # Delete.
        deleted = client.videos.delete(video.id)
        check(deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted", f"{deleted}")
        try:
            client.videos.retrieve(video.id)
            check(False, "a deleted video is still there")
        except openai.NotFoundError as e:
            check(e.code == "video_not_found", f"error {e.code}")

        # Webhooks: one video.completed per video, signed.
        deadline = time.time() + 30
        while len(Receiver.deliveries) < 6 and time.time() < deadline:
            time.sleep(0.05)
        verifier = standardwebhooks.Webhook(SECRET)
        events = []
        for headers, body in Receiver.deliveries:
            verifier.verify(body, headers)
            event = client.webhooks.unwrap(body, headers, secret=SECRET)
            check(headers["webhook-id"] == event.id, "webhook-id is the event id")
            events.append((event.type, event.data.id))
        expected = [("video.completed", v) for v in [video.id, remix.id] + edits]
        check(sorted(events) == sorted(expected), f"{events}")
        try:
            verifier.verify(Receiver.deliveries[0][1] + b" ", Receiver.deliveries[0][0])
            check(False, "a tampered body verified")
        except standardwebhooks.WebhookVerificationError:
            check(True, "a tampered body is refused")

        # kill -9 with one job running and more queued: after a restart each completes exactly once.
        queued = [client.videos.create(prompt=f"clip {i}", extra_body={"steps": 30}).id for i in range(3)]
        deadline = time.time() + 60
        while client.videos.retrieve(queued[0]).status != "in_progress" and time.time() < deadline:
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        leftovers = [n for n in os.listdir(os.path.join(data_dir, "videos")) if ".tmp-" in n]
        server = Server(args, data_dir, hook_port)
        client = server.client
        for video_id in queued:
            poll(client, video_id)
        names = sorted(os.listdir(os.path.join(data_dir, "videos")))
        check(not any(".tmp-" in n for n in names), f"temporary files left: {names} (before restart: {leftovers})")
        for video_id in queued:
            check(names.count(f"{video_id}.mp4") == 1, f"{video_id}.mp4 in {names}")
        listed = [v.id for v in client.videos.list(order="asc")]
        check(listed == [remix.id] + edits + queued, f"after the restart: {listed}")
        server.stop()
        check(server.process.returncode == 0, f"graceful stop exit status {server.process.returncode}")
        check(server.worker is None or server.worker.returncode == 0, "the worker's graceful stop")

    # Image-to-video: `input_reference` as the SDK uploads a file, and as an image_url object (a data: URL).
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(args, data_dir, hook_port, model=args.ti2v_model, size="64x64")
        client = server.client
        with open(os.path.join(os.path.dirname(args.ti2v_model), "reference", "wan22-ti2v-tiny-a", "image.png"), "rb") as f:
            png = f.read()
        uploaded = client.videos.create(prompt="a fox wakes", input_reference=("still.png", png, "image/png"),
                                        seconds="1", extra_body={"seed": 5})
        data_url = "data:image/png;base64," + base64.b64encode(png).decode()
        # The SDK 3.57 checks `input_reference` as a file on the client side, so the object goes in extra_body
        # (sent as the multipart field `input_reference[image_url]`).
        inlined = client.videos.create(prompt="a fox wakes", seconds="1",
                                       extra_body={"seed": 5, "input_reference": {"image_url": data_url}})
        clips = []
        for video in (uploaded, inlined):
            done = poll(client, video.id)
            check(done.size == "64x64", f"image-to-video size: {done.size}")
            clips.append(client.videos.download_content(video.id).read())
            check(clips[-1][4:8] == b"ftyp", "the image-to-video download is an MP4")
        try:
            client.videos.create(prompt="x", extra_body={"input_reference": {"image_url": "https://example.com/a.png"}})
            check(False, "an image URL to fetch was accepted")
        except openai.BadRequestError as e:
            check(e.code == "unsupported_parameter" and e.param == "input_reference", f"error {e.code} {e.param}")
        try:
            # TI2V holds a first frame only.
            client.videos.create(prompt="x", input_reference=("still.png", png, "image/png"),
                                 extra_body={"last_image": {"image_url": data_url}})
            check(False, "a last image was accepted by a model that can't end on one")
        except openai.BadRequestError as e:
            check(e.code == "unsupported_parameter" and e.param == "last_image", f"error {e.code} {e.param}")
        server.stop()

    # Image-to-video on a model that generates only from an image, with two experts (Wan 2.2 I2V-A14B): the first
    # frame uploaded as `input_reference`, the last as a data: URL and the low-noise expert's guidance in extra_body
    # (the SDK has no parameters of its own for them; it sends `last_image[image_url]` and `guidance_scale_2`).
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(args, data_dir, hook_port, model=args.i2v_model, size="48x32")
        client = server.client
        model_dir = args.i2v_model.rstrip("/")
        reference = os.path.join(os.path.dirname(model_dir), "reference", os.path.basename(model_dir))
        with open(os.path.join(reference, "image.png"), "rb") as f:
            first = f.read()
        with open(os.path.join(reference, "last_image.png"), "rb") as f:
            last_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        video = client.videos.create(prompt="a fox wakes and runs off", input_reference=("first.png", first, "image/png"),
                                     seconds="1", extra_body={"seed": 5, "guidance_scale_2": 2.0,
                                                              "last_image": {"image_url": last_url}})
        done = poll(client, video.id)
        check(done.size == "48x32" and done.seconds == "1", f"first-and-last-frame video: {done}")
        check(client.videos.download_content(video.id).read()[4:8] == b"ftyp", "the first-and-last-frame video is an MP4")
        # A remix ends on the same last image.
        remix = client.videos.remix(video.id, prompt="a fox wakes and sits")
        poll(client, remix.id)
        try:
            client.videos.create(prompt="a fox")
            check(False, "text alone was accepted by an image-to-video model")
        except openai.BadRequestError as e:
            check(e.code == "missing_required_parameter" and e.param == "input_reference", f"error {e.code} {e.param}")
        try:
            client.videos.create(prompt="x", input_reference=("first.png", first, "image/png"),
                                 extra_body={"last_image": {"image_url": "https://example.com/last.png"}})
            check(False, "a last image URL to fetch was accepted")
        except openai.BadRequestError as e:
            check(e.code == "unsupported_parameter" and e.param == "last_image", f"error {e.code} {e.param}")
        server.stop()

    receiver.shutdown()
    store = " on PostgreSQL" if args.postgres else ""
    print(f"sdk{store}: {checks} checks passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"sdk: FAILED after {checks} checks: {e!r}", file=sys.stderr)
        sys.exit(1)
    finally:
        for process in Server.started:
            if process.poll() is None:
                process.kill()
