"""Where the bus lives: control and data endpoints from config (ipc:// or tcp://)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from duplexd.bus.curve import CurveConfig


class BusAddresses(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Endpoints of the session host's two ROUTER sockets.

    ``ipc://`` on one machine (the default, under ``run_dir``), ``tcp://`` across machines;
    ``curve``: CURVE encryption and authentication of the links (bus/curve.py).
    """

    control: str
    data: str
    data_hwm: int = 2000
    curve: CurveConfig = CurveConfig()

    def prepare(self) -> None:
        """Create the directories of ipc endpoints; refuse endpoints ZeroMQ can't bind."""
        for addr in (self.control, self.data):
            if addr.startswith("ipc://"):
                path = Path(addr.removeprefix("ipc://"))
                # sun_path is 108 bytes on Linux; a longer path fails obscurely inside libzmq.
                if len(str(path)) > 100:
                    raise ValueError(f"ipc path too long for a unix socket: {path}")
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not addr.startswith(("tcp://", "inproc://")):
                raise ValueError(f"unsupported bus endpoint {addr!r}: use ipc:// or tcp://")


def default_run_dir(port: int) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"{base}/duplexd-{os.getuid()}-{port}"


def ipc_addresses(run_dir: str, data_hwm: int = 2000) -> BusAddresses:
    return BusAddresses(control=f"ipc://{run_dir}/control.sock", data=f"ipc://{run_dir}/data.sock", data_hwm=data_hwm)
