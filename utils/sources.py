"""Inference inputs for detect.py: images, videos, webcams and network streams.

Every loader yields ``(path, im, im0, cap, log)`` per step:

- ``im``: the model input, letterboxed, CHW RGB uint8 ndarray (BCHW for ``LoadStreams``);
- ``im0``: the original HxWx3 BGR frame (a list of them for ``LoadStreams``);
- ``cap``: the ``cv2.VideoCapture`` of a video file, else None;
- ``log``: the progress prefix, e.g. ``"video 1/1 (frame 3/60) /data/a.mp4: "``.

``prepare_image`` is the one pre-processing step shared with the Python API (utils/results.py), so
detect.py and ``torch.hub`` models see identical input tensors for the same image and size.
"""

from __future__ import annotations

import glob
import math
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.augmentations import letterbox
from utils.general import IMG_FORMATS, LOGGER, VID_FORMATS, clean_str

STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
DEFAULT_STREAM_FPS = 30.0


class SourceError(OSError):
    """A source that cannot be read (missing path, stream that does not open); the message says which."""


@dataclass(frozen=True)
class SourceKind:
    """What a ``--source`` string names."""

    is_file: bool  # ends with an image or video suffix
    is_url: bool  # rtsp/rtmp/http(s) address
    webcam: bool  # camera index, .streams list, or live URL -> LoadStreams
    is_streams_list: bool  # a .streams text file with one source per line


def classify_source(source: str | Path) -> SourceKind:
    """Sort a --source value into files/folders/globs (LoadImages) or live inputs (LoadStreams).

    ``"0"`` is webcam 0; a URL is a live stream unless it ends with an image/video suffix; a file
    ending in ``.streams`` lists several live sources.
    """
    s = str(source)
    suffix = Path(urllib.parse.urlparse(s).path if "://" in s else s).suffix[1:].lower()
    is_file = suffix in IMG_FORMATS + VID_FORMATS
    is_url = s.lower().startswith(STREAM_PREFIXES)
    is_streams_list = s.lower().endswith(".streams")
    webcam = s.isnumeric() or is_streams_list or (is_url and not is_file)
    return SourceKind(is_file=is_file, is_url=is_url, webcam=webcam, is_streams_list=is_streams_list)


def prepare_image(
    im0: np.ndarray, img_size: int | Sequence[int], stride: int = 32, auto: bool = True
) -> np.ndarray:
    """Original HxWx3 BGR uint8 -> letterboxed 3xhxw RGB uint8 (contiguous), the model's input layout.

    ``auto`` pads only to the next multiple of ``stride`` (dynamic-shape models); False pads to the full
    ``img_size`` (fixed-shape exports). Boxes map back with ``utils.boxes.scale_boxes``.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    im = letterbox(im0, size, stride=stride, auto=auto)[0]
    return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])


def read_image(path: str | Path) -> np.ndarray | None:
    """Decode an image file (or http(s) URL) to HxWx3 BGR uint8; None when it cannot be decoded."""
    s = str(path)
    try:
        if s.lower().startswith(("http://", "https://")):  # the user named a URL: fetching it is the request
            with urllib.request.urlopen(s, timeout=30) as r:
                data = np.frombuffer(r.read(), dtype=np.uint8)
        else:
            data = np.fromfile(s, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _expand_entry(entry: str) -> list[str]:
    """Files named by one entry: a URL, a .txt list, a glob, a folder (not recursive) or a file."""
    if entry.lower().startswith(STREAM_PREFIXES):
        return [entry]
    p = Path(entry).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out = []
        for ln in lines:  # relative entries: as given if they exist, else beside the list file
            q = Path(ln)
            out += _expand_entry(str(q if q.is_absolute() or q.exists() else p.parent / q))
        return out
    if glob.has_magic(entry):
        return sorted(glob.glob(str(p), recursive=True))
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file())
    if p.is_file():
        return [str(p)]
    raise SourceError(f"source not found: {entry}")


def _suffix(path: str) -> str:
    return Path(urllib.parse.urlparse(path).path if "://" in path else path).suffix[1:].lower()


class LoadImages:
    """Images and videos from a file, folder, glob, .txt list (or a list of these), in sorted order.

    Videos are read frame by frame, keeping every ``vid_stride``-th frame. Images that cannot be
    decoded and videos that cannot be opened are skipped with a warning.
    """

    def __init__(self, path: str | Path | Sequence[str | Path], img_size: int | Sequence[int] = 640,
                 stride: int = 32, auto: bool = True, vid_stride: int = 1):  # fmt: skip
        entries = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
        files = [f for e in entries for f in _expand_entry(e)]
        images = [f for f in files if _suffix(f) in IMG_FORMATS]
        videos = [f for f in files if _suffix(f) in VID_FORMATS]
        if not images and not videos:
            raise SourceError(
                f"no images or videos found in {path}. Supported formats are images: "
                f"{', '.join(IMG_FORMATS)}; videos: {', '.join(VID_FORMATS)}"
            )
        if vid_stride < 1:
            raise ValueError(f"--vid-stride must be >= 1, got {vid_stride}")
        self.files = images + videos
        self.video_flag = [False] * len(images) + [True] * len(videos)
        self.nf = len(self.files)
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, vid_stride
        self.mode = "image"
        self.cap: cv2.VideoCapture | None = None
        self.frame = 0
        self.frames = 0
        self.count = 0
        self.bs = 1

    def __len__(self) -> int:
        return self.nf

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, cv2.VideoCapture | None, str]]:
        self.count = 0
        while self.count < self.nf:
            path = self.files[self.count]
            if self.video_flag[self.count]:
                yield from self._video_frames(path)
            else:
                im0 = read_image(path)
                if im0 is None:
                    LOGGER.warning(f"WARNING: skipping unreadable image {path}")
                else:
                    self.mode = "image"
                    log = f"image {self.count + 1}/{self.nf} {path}: "
                    yield path, prepare_image(im0, self.img_size, self.stride, self.auto), im0, None, log
            self.count += 1

    def _video_frames(self, path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, cv2.VideoCapture, str]]:
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            LOGGER.warning(f"WARNING: skipping video that cannot be opened {path}")
            return
        self.mode, self.cap, self.frame = "video", cap, 0
        self.frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) // self.vid_stride  # frames stride, 2*stride ...
        try:
            while True:
                for _ in range(self.vid_stride - 1):
                    cap.grab()
                ok, im0 = cap.read()
                if not ok or im0 is None:
                    break
                self.frame += 1
                log = f"video {self.count + 1}/{self.nf} (frame {self.frame}/{self.frames}) {path}: "
                yield path, prepare_image(im0, self.img_size, self.stride, self.auto), im0, cap, log
        finally:
            cap.release()


def read_streams_list(path: str | Path) -> list[str]:
    """Sources listed one per line in a .streams file (blank lines and # comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"streams list not found: {path}")
    lines = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    sources = [ln for ln in lines if ln]
    if not sources:
        raise SourceError(f"{path}: lists no streams (one camera index or URL per line)")
    return sources


class _StreamReader:
    """One capture read on a background thread; keeps the newest frame and a counter of frames read."""

    def __init__(
        self, index: int, source: str, vid_stride: int, stop: threading.Event, cond: threading.Condition
    ):
        self.index, self.source, self.vid_stride = index, source, vid_stride
        self.cap = cv2.VideoCapture(int(source) if source.isnumeric() else source)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(f"failed to open stream {source!r} (check the camera index or URL)")
        ok, frame = self.cap.read()
        if not ok or frame is None:
            self.cap.release()
            raise SourceError(f"stream {index}: {source} opened but gave no frame")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_STREAM_FPS
        self.frame, self.count, self.alive = frame, 1, True
        self._stop, self._cond = stop, cond
        self.thread = threading.Thread(target=self._run, name=f"stream-{index}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in range(self.vid_stride - 1):
                self.cap.grab()
            ok, frame = self.cap.read()
            with self._cond:
                if ok and frame is not None:
                    self.frame, self.count = frame, self.count + 1
                else:
                    LOGGER.warning(
                        f"WARNING: stream {self.index} ({self.source}) ended or stopped responding"
                    )
                    self.alive = False
                self._cond.notify_all()
            if not self.alive:
                break
        self.cap.release()


class LoadStreams:
    """Live sources (webcam indices, rtsp/rtmp/http URLs, or a .streams list) read in background threads.

    Reader threads start with iteration. Each step yields the newest frame of every stream as one batch;
    a live frame is never yielded twice (frames that arrive faster than inference are dropped).
    Iteration ends when every stream has ended; ``close()`` (also on exit from ``with``) stops the threads.
    """

    def __init__(self, sources: str | Sequence[str] = "0", img_size: int | Sequence[int] = 640,
                 stride: int = 32, auto: bool = True, vid_stride: int = 1):  # fmt: skip
        if isinstance(sources, str):
            sources = read_streams_list(sources) if sources.lower().endswith(".streams") else [sources]
        self.sources = [clean_str(str(s)) for s in sources]
        self.mode = "stream"
        self.img_size, self.stride, self.vid_stride = img_size, stride, vid_stride
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self.readers: list[_StreamReader] = []
        try:
            for i, s in enumerate(sources):
                self.readers.append(_StreamReader(i, str(s), vid_stride, self._stop, self._cond))
                r = self.readers[-1]
                h, w = r.frame.shape[:2]
                LOGGER.info(f"{i + 1}/{len(sources)}: {s}... Success ({w}x{h} at {r.fps:.2f} FPS)")
        except BaseException:
            self.close()
            raise
        shapes = {prepare_image(r.frame, img_size, stride, auto).shape for r in self.readers}
        self.auto = auto and len(shapes) == 1  # different shapes must pad to one size to form a batch
        if auto and not self.auto:
            LOGGER.warning("WARNING: streams differ in shape; padding every frame to the full --imgsz")
        self.bs = len(self.readers)
        self.fps = [r.fps for r in self.readers]

    def __len__(self) -> int:
        return len(self.readers)

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray, list[np.ndarray], None, str]]:
        if self._stop.is_set():  # closed: nothing more to read
            return
        seen = [0] * len(self.readers)
        for r in self.readers:  # reading starts when iteration does
            if r.thread.ident is None:
                r.thread.start()
        try:
            while True:
                frames = self._next_frames(seen)
                if frames is None:
                    return
                im = np.stack([prepare_image(f, self.img_size, self.stride, self.auto) for f in frames])
                yield self.sources, im, frames, None, ""
        finally:
            self.close()

    def _next_frames(self, seen: list[int], timeout: float = 30.0) -> list[np.ndarray] | None:
        """Wait until every live stream has a frame newer than the last one yielded; None when all ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                fresh = [r.count > seen[i] for i, r in enumerate(self.readers)]
                if all(f or not r.alive for f, r in zip(fresh, self.readers)) and any(fresh):
                    break
                if not any(r.alive for r in self.readers) and not any(fresh):
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(f"no new frame from the streams for {timeout:.0f} s")
                self._cond.wait(remaining)
            for i, r in enumerate(self.readers):
                seen[i] = r.count
            return [r.frame.copy() for r in self.readers]

    def close(self) -> None:
        """Stop the reader threads and release the captures (safe to call twice)."""
        self._stop.set()
        for r in self.readers:
            if r.thread.is_alive():
                r.thread.join(timeout=5)
            if not r.thread.is_alive():
                r.cap.release()

    def __enter__(self) -> LoadStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_source(source: str | Path, img_size: int | Sequence[int], stride: int, auto: bool,
                  vid_stride: int = 1) -> LoadImages | LoadStreams:  # fmt: skip
    """The loader for a --source value (see ``classify_source``)."""
    kind = classify_source(source)
    cls = LoadStreams if kind.webcam else LoadImages
    return cls(str(source), img_size=img_size, stride=stride, auto=auto, vid_stride=vid_stride)
