"""Sense data (SPC-4 4.5): fixed (0x70) or descriptor (0x72) format, chosen by D_SENSE.

Handlers raise :class:`CheckCondition`; the logical unit renders it in the format its
control mode page selects.  Every ASC/ASCQ pair the SCSI layer uses is named here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Sense keys
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
COPY_ABORTED = 0xA
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# SAM status codes
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
ACA_ACTIVE = 0x30
TASK_ABORTED = 0x40

# (asc, ascq) pairs
NO_ADDITIONAL_SENSE = (0x00, 0x00)
LUN_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
LUN_NOT_READY_INIT_REQUIRED = (0x04, 0x02)
LUN_NOT_READY_FORMAT_IN_PROGRESS = (0x04, 0x04)
LUN_NOT_READY_SANITIZE_IN_PROGRESS = (0x04, 0x1B)
COPY_TARGET_DEVICE_NOT_REACHABLE = (0x0D, 0x02)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_VALUE_INVALID = (0x26, 0x02)
TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE = (0x26, 0x09)
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)
WRITE_PROTECTED = (0x27, 0x00)
SANITIZE_COMMAND_FAILED = (0x31, 0x03)
POWER_ON_RESET = (0x29, 0x00)
POWER_ON_OCCURRED = (0x29, 0x01)
BUS_RESET_OCCURRED = (0x29, 0x02)
BUS_DEVICE_RESET_OCCURRED = (0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)
COMMANDS_CLEARED_BY_POWER_LOSS = (0x2F, 0x01)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
THIN_PROVISIONING_SOFT_THRESHOLD_REACHED = (0x38, 0x07)
REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
INVALID_MESSAGE_ERROR = (0x49, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT = (0x0E, 0x03)
OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
MEDIUM_NOT_PRESENT = (0x3A, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)


@dataclass(slots=True)
class SenseKeySpecific:
    """Field pointer (SPC-4 4.5.2.4.2): which CDB/parameter byte and bit was wrong."""

    cdb: bool  # C/D: True = the CDB, False = the parameter list
    byte: int
    bit: int | None = None

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 7)
        return bytes((b0,)) + struct.pack(">H", self.byte & 0xFFFF)


class CheckCondition(Exception):  # noqa: N818 - a SCSI status, not a Python error
    """Terminate the command with CHECK CONDITION and this sense."""

    def __init__(
        self,
        key: int,
        code: tuple[int, int],
        info: int | None = None,
        sks: SenseKeySpecific | bytes | None = None,
    ) -> None:
        super().__init__(f"key={key:#x} asc/ascq={code[0]:#04x}/{code[1]:#04x}")
        self.key = key
        self.asc, self.ascq = code
        self.info = info
        self.sks = sks

    def encode(self, descriptor: bool) -> bytes:
        return build_sense(self.key, (self.asc, self.ascq), descriptor, self.info, self.sks)


class ReservationConflict(Exception):  # noqa: N818
    """Terminate the command with RESERVATION CONFLICT status (no sense data)."""


def build_sense(
    key: int,
    code: tuple[int, int],
    descriptor: bool = False,
    info: int | None = None,
    sks: SenseKeySpecific | bytes | None = None,
) -> bytes:
    asc, ascq = code
    sks_bytes = sks.encode() if isinstance(sks, SenseKeySpecific) else sks
    if descriptor:
        descs = b""
        if info is not None:  # information descriptor, VALID set
            descs += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, info & 0xFFFFFFFFFFFFFFFF)
        if sks_bytes:
            descs += bytes((0x02, 0x06, 0, 0)) + sks_bytes + b"\0"
        return bytes((0x72, key & 0xF, asc, ascq, 0, 0, 0, len(descs))) + descs
    buf = bytearray(18)
    buf[0] = 0x70
    buf[2] = key & 0xF
    if info is not None:
        buf[0] |= 0x80  # VALID: the INFORMATION field is meaningful
        struct.pack_into(">I", buf, 3, info & 0xFFFFFFFF)
    buf[7] = 10
    buf[12] = asc
    buf[13] = ascq
    if sks_bytes:
        buf[15:18] = sks_bytes
    return bytes(buf)


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, sks=SenseKeySpecific(True, byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, sks=SenseKeySpecific(False, byte, bit)
    )


def param_list_length_error() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def short_data_out() -> CheckCondition:
    """The initiator's Data-Out (its expected data transfer length) holds less than the CDB
    needs: INVALID FIELD IN COMMAND INFORMATION UNIT (SAM-5 5.4.3: the mismatch is in the
    transport's command IU, not in the CDB)."""
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_INFORMATION_UNIT)


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def invalid_opcode() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, sks=SenseKeySpecific(True, 0))


def write_protected() -> CheckCondition:
    return CheckCondition(DATA_PROTECT, WRITE_PROTECTED)


def miscompare(offset: int) -> CheckCondition:
    return CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY, info=offset)


def lu_not_supported() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)


def unit_attention(code: tuple[int, int]) -> CheckCondition:
    return CheckCondition(UNIT_ATTENTION, code)


def sense_key_asc(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed or descriptor sense data (tests and logging)."""
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    return sense[2] & 0xF, sense[12], sense[13]
