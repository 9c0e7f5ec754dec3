//! Delivered and read cursors: advanced by `ack` and `read`, announced as receipts, and
//! written to the log coalesced, once per turn.

use super::turn::{deliver, Empty, Handled, Request};
use super::Sequencer;
use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::event::{self, ReceiptKind};
use crate::output::Output;
use crate::protocol::ErrorCode;
use crate::record::{ChatRecord, CursorAdvance};

impl Sequencer {
    /// `ack` (`read` false) or `read`.
    pub(super) fn cursor(
        &mut self,
        request: &Request,
        seq: u64,
        read: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let (conv, user, device) = (&request.conv, &request.user, &request.device);
        let conversation = self.member_of(conv, user)?;
        if seq > conversation.last_seq {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                format!("seq {seq} is beyond the last seq {}", conversation.last_seq),
            )));
        }
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
        request.ok(out, &Empty {});
        Ok(())
    }

    /// Write the turn's cursor advances as one record. Returns its LSN, if one was written.
    pub fn flush_cursors(
        &mut self,
        now: Now,
        log: &mut dyn ChatLog,
    ) -> Result<Option<u64>, LogError> {
        if self.dirty_cursors.is_empty() {
            return Ok(None);
        }
        let advances: Vec<CursorAdvance> = self
            .dirty_cursors
            .iter()
            .map(|((conv, user, device), seq)| CursorAdvance {
                conv: conv.to_string(),
                user: user.to_string(),
                device: device.as_ref().map(|d| d.to_string()),
                seq: *seq,
            })
            .collect();
        let lsn = log.append(now.unix_ms, &ChatRecord::Cursors(advances).encode())?;
        self.dirty_cursors.clear();
        Ok(Some(lsn))
    }

    pub fn has_dirty_cursors(&self) -> bool {
        !self.dirty_cursors.is_empty()
    }
}
