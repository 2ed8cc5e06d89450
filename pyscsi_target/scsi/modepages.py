"""Mode pages of a direct-access logical unit: current, changeable, default and saved.

Each page is kept as its exact wire bytes (page code byte with PS clear, page length,
parameters), so MODE SENSE is a copy and MODE SELECT a masked compare-and-store.
"""

from __future__ import annotations

import json

from pyscsi_target.scsi import sense as S

RW_ERROR_RECOVERY = 0x01
CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F


def _page(code: int, params: bytes) -> bytes:
    return bytes((code, len(params))) + params


def _defaults() -> dict[int, bytes]:
    # Read-write error recovery: AWRE|ARRE (we never return recoverable errors), no retries.
    rw = _page(RW_ERROR_RECOVERY, bytes((0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    # Caching: WCE=1 (writes go to the page cache; FUA/SYNCHRONIZE CACHE make them durable).
    caching = _page(CACHING, bytes((0x04,)) + bytes(17))
    # Control: TST=0 (one task set), QAM=1 (unrestricted reordering), QErr=0, TAS=0
    # (tasks aborted by another nexus end silently, with a unit attention),
    # busy timeout unlimited (0xFFFF).
    control = _page(CONTROL, bytes((0x00, 0x10, 0x00, 0x00, 0, 0, 0xFF, 0xFF, 0, 0)))
    # Informational exceptions: DEXCPT=1 (we have no failure prediction), MRIE=0.
    iec = _page(INFORMATIONAL_EXCEPTIONS, bytes((0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    return {RW_ERROR_RECOVERY: rw, CACHING: caching, CONTROL: control, INFORMATIONAL_EXCEPTIONS: iec}


# Changeable bits, same layout as the pages.
_CHANGEABLE: dict[int, bytes] = {
    RW_ERROR_RECOVERY: _page(RW_ERROR_RECOVERY, bytes(10)),
    CACHING: _page(CACHING, bytes((0x04,)) + bytes(17)),  # WCE
    # D_SENSE and GLTSD in byte 2; QAM in byte 3; SWP in byte 4.
    CONTROL: _page(CONTROL, bytes((0x06, 0xF0, 0x08, 0, 0, 0, 0, 0, 0, 0))),
    INFORMATIONAL_EXCEPTIONS: _page(INFORMATIONAL_EXCEPTIONS, bytes((0x08, 0x0F, 0, 0, 0, 0, 0, 0, 0, 0))),
}


class ModePages:
    """Mode parameters of one LU (shared by every I_T nexus, as SPC-4 allows)."""

    ORDER = (RW_ERROR_RECOVERY, CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS)

    def __init__(self, saved: bytes | None = None) -> None:
        self.default = _defaults()
        self.saved = dict(self.default)
        if saved:
            try:
                loaded = {int(k): bytes.fromhex(v) for k, v in json.loads(saved).items()}
                for code, page in loaded.items():
                    if code in self.default and len(page) == len(self.default[code]):
                        self.saved[code] = page
            except (ValueError, TypeError, AttributeError):
                pass  # a corrupt record falls back to defaults
        self.current = {k: bytearray(v) for k, v in self.saved.items()}

    def serialize_saved(self) -> bytes:
        return json.dumps({str(k): v.hex() for k, v in self.saved.items()}).encode()

    # --- fields the device model reads -------------------------------------------------

    @property
    def wce(self) -> bool:
        return bool(self.current[CACHING][2] & 0x04)

    @property
    def d_sense(self) -> bool:
        return bool(self.current[CONTROL][2] & 0x04)

    @property
    def swp(self) -> bool:
        return bool(self.current[CONTROL][4] & 0x08)

    @property
    def tas(self) -> bool:
        return bool(self.current[CONTROL][5] & 0x40)

    def reset_to_saved(self) -> None:
        self.current = {k: bytearray(v) for k, v in self.saved.items()}

    # --- MODE SENSE ----------------------------------------------------------------

    def pages_for(self, page_code: int, subpage: int, pc: int) -> bytes:
        """The requested page(s) for page control ``pc``; raises for unknown pages."""
        if pc == 1:
            src: dict[int, bytes] | dict[int, bytearray] = _CHANGEABLE
        elif pc == 2:
            src = self.default
        elif pc == 3:
            src = self.saved
        else:
            src = self.current
        if page_code == ALL_PAGES:
            if subpage not in (0x00, 0xFF):
                raise S.invalid_cdb(3)
            return b"".join(bytes(src[c]) for c in self.ORDER)
        if subpage not in (0x00, 0xFF) or page_code not in src:
            raise S.invalid_cdb(2, 5) if page_code not in src else S.invalid_cdb(3)
        return bytes(src[page_code])

    # --- MODE SELECT ---------------------------------------------------------------

    def select(self, pages: memoryview, save: bool) -> bool:
        """Apply MODE SELECT page data (after header and block descriptors).

        Validates everything before changing anything; returns True when a current
        value changed (the caller then raises MODE PARAMETERS CHANGED elsewhere).
        """
        staged: dict[int, bytearray] = {}
        pos = 0
        while pos < len(pages):
            if len(pages) - pos < 2:
                raise S.param_list_length_error()
            code = pages[pos] & 0x3F
            spf = pages[pos] & 0x40
            if spf:  # sub-page format: we have none
                raise S.invalid_param(pos, 6)
            plen = pages[pos + 1]
            if code not in self.default:
                raise S.invalid_param(pos, 5)
            if plen + 2 != len(self.default[code]):
                raise S.invalid_param(pos + 1)
            if pos + 2 + plen > len(pages):
                raise S.param_list_length_error()
            new = pages[pos : pos + 2 + plen]
            cur = staged.get(code, self.current[code])
            mask = _CHANGEABLE[code]
            for i in range(2, len(new)):
                if (new[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise S.invalid_param(pos + i)
            staged[code] = bytearray(cur[:2]) + bytearray(new[2:])
            pos += 2 + plen
        changed = False
        for code, page in staged.items():
            if page != self.current[code]:
                changed = True
            self.current[code] = page
            if save:
                self.saved[code] = bytes(page)
        return changed
