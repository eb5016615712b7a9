"""Small value types shared by every layer."""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", int)  # a daemon's id on the wire: u32, 0 is reserved
Seqno = NewType("Seqno", int)  # per-link packet sequence number, u64, starts at 1
Epoch = NewType("Epoch", int)  # a link endpoint's stream incarnation, u32, never 0

MAX_NODE_ID = 0xFFFF_FFFF
