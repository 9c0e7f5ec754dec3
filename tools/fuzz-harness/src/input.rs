//! How every target reads its input: a few leading bytes of options, then chunks of
//! `[kind][length: u16 little-endian][bytes]`, so that libFuzzer's mutations of one
//! chunk leave the others in place. A length past the end takes what is left.

/// A reader over a fuzz input. Reading past the end yields zeros and empty chunks.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next byte, or 0 past the end.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&byte, rest)) => {
                self.data = rest;
                byte
            }
            None => 0,
        }
    }

    /// The next chunk, `None` once the input is spent.
    pub fn chunk(&mut self) -> Option<(u8, &'a [u8])> {
        if self.data.is_empty() {
            return None;
        }
        let kind = self.byte();
        let len = usize::from(u16::from_le_bytes([self.byte(), self.byte()]));
        let take = len.min(self.data.len());
        let (chunk, rest) = self.data.split_at(take);
        self.data = rest;
        Some((kind, chunk))
    }

    /// What is left, unread.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes inputs in the chunk format, for seeds and tests.
#[derive(Default)]
pub struct Chunks(Vec<u8>);

impl Chunks {
    /// An input that starts with these option bytes.
    pub fn with_options(options: &[u8]) -> Self {
        Self(options.to_vec())
    }

    pub fn push(mut self, kind: u8, bytes: &[u8]) -> Self {
        let len = u16::try_from(bytes.len()).expect("a seed chunk fits a u16 length");
        self.0.push(kind);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_as_written() {
        let data = Chunks::with_options(&[7])
            .push(1, b"ab")
            .push(2, b"")
            .finish();
        let mut input = Input::new(&data);
        assert_eq!(input.byte(), 7);
        assert_eq!(input.chunk(), Some((1, &b"ab"[..])));
        assert_eq!(input.chunk(), Some((2, &b""[..])));
        assert_eq!(input.chunk(), None);
        assert_eq!(input.byte(), 0);
    }

    #[test]
    fn a_length_past_the_end_takes_the_rest() {
        let mut input = Input::new(&[3, 0xff, 0xff, b'x']);
        assert_eq!(input.chunk(), Some((3, &b"x"[..])));
    }
}
