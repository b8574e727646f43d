"""A pynetdicom storage SCP that only writes what it receives: the floor of a Python receiver.

Started by ``bench.run_benchmarks`` as ``python -m bench.bare_scp PORT FOLDER [--fsync]``. Each
C-STORE writes a preamble, the file meta information and the received data set bytes to one file
(with ``--fsync``, flushed to disk before the success status), with no parsing, no checks and no
database. The node does all of that and more, so the gap between the two is what the node's own
work costs.
"""

from __future__ import annotations

import argparse
import os
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

#: DICOM files start with a 128-byte preamble and the prefix "DICM" (PS3.10 section 7.1).
PREAMBLE = b"\x00" * 128 + b"DICM"


def store_handler(folder: Path, fsync: bool) -> Any:
    """Return a C-STORE handler that writes each instance to ``folder``."""

    def handle(event: Any) -> int:
        header = BytesIO()
        header.write(PREAMBLE)
        write_file_meta_info(header, event.file_meta, enforce_standard=True)
        path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with open(path, "wb") as file:
            file.write(header.getvalue())
            file.write(event.request.DataSet.getvalue())
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        return 0x0000

    return handle


def main() -> int:
    """Serve on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="TCP port on 127.0.0.1")
    parser.add_argument("folder", type=Path, help="folder for the received files; created if missing")
    parser.add_argument("--fsync", action="store_true", help="fsync each file before returning the success status (default: off)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)

    ae = AE(ae_title="BARESCP")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    ae.start_server(
        ("127.0.0.1", args.port), block=True,
        evt_handlers=[(evt.EVT_C_STORE, store_handler(args.folder, args.fsync))],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
