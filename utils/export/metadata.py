"""What an exported model carries so that a loader can use it without the checkpoint.

Every format stores the same plain fields: TorchScript as JSON in the extra file ``config.txt``,
ONNX as ``metadata_props`` (one JSON-encoded value per key), OpenVINO as ``metadata.yaml`` beside
the ``.xml``. ``ExportMetadata.from_dict`` accepts all three spellings (JSON strings, str keys).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

METADATA_VERSION = "1"
TORCHSCRIPT_CONFIG = "config.txt"  # name of the extra file inside a .torchscript archive
OPENVINO_METADATA = "metadata.yaml"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ExportMetadata:
    """Fields a loader needs: stride (pixels), class names, input size (h, w), batch and flags.

    ``imgsz`` and ``batch`` are the export's example shape; with ``dynamic`` they are only a hint
    and any batch and any size that is a multiple of ``stride`` may be fed.
    """

    stride: int
    names: dict[int, str]
    imgsz: tuple[int, int]
    batch: int = 1
    dynamic: bool = False
    half: bool = False
    int8: bool = False
    format: str = ""
    task: str = "detect"
    description: str = "YOLO detector"
    version: str = METADATA_VERSION
    date: str = field(default_factory=_now)

    @property
    def nc(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists)."""
        d = asdict(self)
        d["imgsz"] = [int(s) for s in self.imgsz]
        d["names"] = {int(k): str(v) for k, v in self.names.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_strings(self) -> dict[str, str]:
        """One JSON string per field, for formats whose metadata values must be strings (ONNX)."""
        return {k: json.dumps(v) for k, v in self.to_dict().items()}

    def with_format(self, fmt: str, **changes: Any) -> ExportMetadata:
        """Copy naming the format (and any other changed fields)."""
        return ExportMetadata(**{**asdict(self), "format": fmt, **changes})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "metadata") -> ExportMetadata:
        """Parse a dict from any format; values may be JSON strings and names keys strings.

        Raises ValueError naming ``source`` when stride, names or imgsz are missing or malformed.
        """
        d = {k: _decode(v) for k, v in raw.items()}
        missing = [k for k in ("stride", "names", "imgsz") if k not in d]
        if missing:
            raise ValueError(
                f"{source}: export metadata lacks {', '.join(missing)} (not exported by export.py?)"
            )
        try:
            names = d["names"]
            names = dict(enumerate(names)) if isinstance(names, list) else names
            imgsz = d["imgsz"] if isinstance(d["imgsz"], list) else [d["imgsz"]] * 2
            return cls(
                stride=int(d["stride"]),
                names={int(k): str(v) for k, v in names.items()},
                imgsz=(int(imgsz[0]), int(imgsz[-1])),
                batch=int(d.get("batch", 1)),
                dynamic=bool(d.get("dynamic", False)),
                half=bool(d.get("half", False)),
                int8=bool(d.get("int8", False)),
                format=str(d.get("format", "")),
                task=str(d.get("task", "detect")),
                description=str(d.get("description", "")),
                version=str(d.get("version", METADATA_VERSION)),
                date=str(d.get("date", "")),
            )
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise ValueError(f"{source}: malformed export metadata ({e})") from None


def _decode(value: Any) -> Any:
    """JSON-decode strings that hold JSON (ONNX values); leave everything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
