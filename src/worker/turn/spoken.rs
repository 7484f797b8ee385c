//! What an attempt has said so far, by API message and content block, so
//! the text of a cut API stream can be taken back and the rest restated.
//!
//! When an API stream breaks mid-answer the CLI retries the request inside
//! the same attempt and prints `abandoned_blocks` for the cut message; the
//! deltas it printed for those blocks are not part of the answer. The turn
//! then publishes `text_reset` and restates what remains, so an attempt's
//! `text` events after its last `text_reset` always add up to its answer.

#[derive(Debug, Default)]
pub(super) struct Spoken {
    pieces: Vec<Piece>,
}

#[derive(Debug)]
struct Piece {
    message_id: Option<String>,
    block: u64,
    text: String,
}

impl Spoken {
    /// Records text published for `block` of `message_id`.
    pub fn push(&mut self, message_id: Option<&str>, block: u64, text: &str) {
        match self.pieces.last_mut() {
            Some(p) if p.message_id.as_deref() == message_id && p.block == block => {
                p.text.push_str(text)
            }
            _ => self.pieces.push(Piece {
                message_id: message_id.map(str::to_string),
                block,
                text: text.to_string(),
            }),
        }
    }

    /// Takes back the text of `message_id`'s blocks from `from` on. `Some`
    /// with the text that still stands when anything was taken back.
    pub fn abandon(&mut self, message_id: &str, from: u64) -> Option<String> {
        let before = self.pieces.len();
        self.pieces
            .retain(|p| !(p.message_id.as_deref() == Some(message_id) && p.block >= from));
        (self.pieces.len() != before).then(|| self.pieces.iter().map(|p| p.text.as_str()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoning_takes_back_only_the_cut_blocks() {
        let mut s = Spoken::default();
        s.push(Some("m1"), 0, "Let me look. ");
        s.push(Some("m2"), 0, "It is ");
        s.push(Some("m2"), 0, "fine.");
        s.push(Some("m2"), 1, " And th");
        // Nothing of m3 was said: nothing to take back.
        assert_eq!(s.abandon("m3", 0), None);
        assert_eq!(
            s.abandon("m2", 1).as_deref(),
            Some("Let me look. It is fine.")
        );
        assert_eq!(s.abandon("m2", 0).as_deref(), Some("Let me look. "));
        assert_eq!(s.abandon("m2", 0), None);
        s.push(None, 0, "whole");
        assert_eq!(s.abandon("m1", 0).as_deref(), Some("whole"));
    }
}
