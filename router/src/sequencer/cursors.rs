//! Delivered and read cursors: advanced by `ack` and `read`, announced as receipts, and
//! written to the log coalesced, once per turn.

use super::turn::{deliver, Empty, Handled, Request, Turn};
use super::{CursorKey, Sequencer};
use crate::chat_log::{ChatLog, LogError, MIN_RECORD_BYTES};
use crate::clock::Now;
use crate::event::{self, ReceiptKind};
use crate::protocol::ErrorCode;
use crate::record::{encoded_len, ChatRecord, CursorAdvance, CURSORS_RECORD_OVERHEAD};

impl Sequencer {
    /// `ack` (`read` false) or `read`.
    pub(super) fn cursor(
        &mut self,
        request: &Request,
        seq: u64,
        read: bool,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let (conv, user, device) = (&request.conv, &request.caller.user, &request.caller.device);
        let conversation = self.member_of(conv, user)?;
        if seq > conversation.last_seq {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                format!("seq {seq} is beyond the last seq {}", conversation.last_seq),
            )));
        }
        // The advance is answered now and written at the turn's end: while the log
        // refuses appends, refuse it here, before anything changes.
        if let Some(refusal) = turn.log.refusing() {
            return Err(Handled::Log(refusal));
        }
        let out = &mut *turn.out;
        let members = conversation.members_shared();
        let conversation = self.convs.get_mut(conv).expect("checked above");
        // Reading implies receiving: a read also moves this device's delivered cursor,
        // so a read receipt never runs ahead of the delivered one.
        let before = conversation.delivered_seq(user, device);
        if let Some(delivered) = conversation.advance_delivered(user, device, seq) {
            let doc = event::receipt(conv, user, ReceiptKind::Delivered, delivered);
            deliver(out, members.clone(), None, doc, false);
        }
        if seq > before {
            self.dirty_cursors
                .insert((conv.clone(), user.clone(), Some(device.clone())), seq);
        }
        if read && conversation.advance_read(user, seq) {
            let doc = event::receipt(conv, user, ReceiptKind::Read, seq);
            deliver(out, members, None, doc, false);
            self.dirty_cursors
                .insert((conv.clone(), user.clone(), None), seq);
        }
        request.caller.ok(out, &Empty {});
        Ok(())
    }

    /// Write the turn's cursor advances, in as few records as the log's limit allows.
    /// Returns the last record's LSN, if one was written. When the log refuses a record,
    /// the advances of those before it are written and the rest wait for the next try.
    pub fn flush_cursors(
        &mut self,
        now: Now,
        log: &mut dyn ChatLog,
    ) -> Result<Option<u64>, LogError> {
        if self.dirty_cursors.is_empty() {
            return Ok(None);
        }
        let max = log.max_record_bytes();
        debug_assert!(max >= MIN_RECORD_BYTES, "a log takes {max} bytes at most");
        let (keys, mut advances): (Vec<CursorKey>, Vec<CursorAdvance>) = self
            .dirty_cursors
            .iter()
            .map(|(key, seq)| (key.clone(), advance_of(key, *seq)))
            .unzip();
        let mut written = 0;
        let mut last_lsn = None;
        for len in record_lengths(&advances, max) {
            let payload = ChatRecord::Cursors(advances.drain(..len).collect()).encode();
            debug_assert!(payload.len() <= max, "cursor records fit the log");
            // Their commands were answered (the replies wait for this record).
            match log.append_deferred(now.unix_ms, &payload) {
                Ok(lsn) => {
                    last_lsn = Some(lsn);
                    written += len;
                }
                Err(error) => {
                    for key in &keys[..written] {
                        self.dirty_cursors.remove(key);
                    }
                    return Err(error);
                }
            }
        }
        self.dirty_cursors.clear();
        Ok(last_lsn)
    }

    pub fn has_dirty_cursors(&self) -> bool {
        !self.dirty_cursors.is_empty()
    }
}

fn advance_of((conv, user, device): &CursorKey, seq: u64) -> CursorAdvance {
    CursorAdvance {
        conv: conv.to_string(),
        user: user.to_string(),
        device: device.as_ref().map(|d| d.to_string()),
        seq,
    }
}

/// How many of `advances`, in order, go in each record so that every record stays
/// within `max` bytes (one advance always fits: see `MIN_RECORD_BYTES`).
fn record_lengths(advances: &[CursorAdvance], max: usize) -> Vec<usize> {
    let mut lengths = Vec::new();
    let (mut len, mut bytes) = (0, CURSORS_RECORD_OVERHEAD);
    for advance in advances {
        let size = encoded_len(advance);
        if len > 0 && bytes + size > max {
            lengths.push(len);
            (len, bytes) = (0, CURSORS_RECORD_OVERHEAD);
        }
        len += 1;
        bytes += size;
    }
    if len > 0 {
        lengths.push(len);
    }
    lengths
}
