//! Fixed-size records for shared memory: a ring addressed by sequence numbers, and a bounded
//! string. Both are plain `#[repr(C)]` data with no pointers, valid when all-zero, so the edge
//! can place them in zeroed shared memory and copy them between processes. Pure: the locking
//! around them is the edge's (`events::queue`).

/// A string of at most `N` bytes, cut at a character boundary. All-zero is "absent".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FixedStr<const N: usize> {
    len: u16,
    present: bool,
    bytes: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub const EMPTY: Self = FixedStr { len: 0, present: false, bytes: [0; N] };

    pub fn new(s: Option<&str>) -> Self {
        let Some(s) = s else { return Self::EMPTY };
        let mut end = s.len().min(N).min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; N];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        FixedStr { len: end as u16, present: true, bytes }
    }

    pub fn get(&self) -> Option<&str> {
        if !self.present {
            return None;
        }
        let len = usize::from(self.len).min(N);
        std::str::from_utf8(&self.bytes[..len]).ok()
    }
}

/// A ring of `N` records addressed by ever-growing sequence numbers: `head` is the next to
/// write, `tail` the next to read. A reader moves `tail` only after it has finished with the
/// records (the event writer: after they are committed), so `tail` is also "done so far".
/// All-zero is an empty ring.
#[repr(C)]
pub struct Ring<T: Copy, const N: usize> {
    head: u64,
    tail: u64,
    dropped: u64,
    items: [T; N],
}

impl<T: Copy, const N: usize> Ring<T, N> {
    /// Records waiting.
    pub fn len(&self) -> usize {
        (self.head - self.tail) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Sequence number of the next record to be pushed: everything queued so far is below it.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Sequence number of the oldest record not yet consumed.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Records refused (ring full) or discarded since the last reset.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends; returns the length before, or None (counted as dropped) when full.
    pub fn push(&mut self, item: &T) -> Option<usize> {
        let len = self.len();
        if len >= N {
            self.dropped += 1;
            return None;
        }
        self.items[(self.head % N as u64) as usize] = *item;
        self.head += 1;
        Some(len)
    }

    /// The oldest record not yet consumed.
    pub fn oldest(&self) -> Option<T> {
        (!self.is_empty()).then(|| self.items[(self.tail % N as u64) as usize])
    }

    /// Copies up to `max` records from the tail without consuming them.
    pub fn peek(&self, out: &mut Vec<T>, max: usize) {
        out.clear();
        for seq in self.tail..self.tail + self.len().min(max) as u64 {
            out.push(self.items[(seq % N as u64) as usize]);
        }
    }

    pub fn consume(&mut self, n: usize) {
        self.tail += (n.min(self.len())) as u64;
    }

    /// Starts the counts again (for a ring passed to another owner).
    pub fn reset(&mut self) {
        self.head = 0;
        self.tail = 0;
        self.dropped = 0;
    }

    /// Drops up to `n` records from the tail, counting them as dropped.
    pub fn discard(&mut self, n: usize) {
        let n = n.min(self.len());
        self.tail += n as u64;
        self.dropped += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring<const N: usize>() -> Box<Ring<u32, N>> {
        Box::new(Ring { head: 0, tail: 0, dropped: 0, items: [0; N] })
    }

    #[test]
    fn a_ring_hands_records_back_in_order_and_drops_when_full() {
        let mut r = ring::<4>();
        assert_eq!(r.push(&1), Some(0), "the writer is told the ring was empty");
        assert_eq!(r.push(&2), Some(1));
        let mut out = Vec::new();
        r.peek(&mut out, 10);
        assert_eq!(out, [1, 2]);
        assert_eq!(r.len(), 2, "peeking consumes nothing");
        r.consume(1);
        for x in 3..=5 {
            assert!(r.push(&x).is_some());
        }
        assert_eq!(r.push(&6), None, "a full ring refuses");
        assert_eq!(r.dropped(), 1);
        r.peek(&mut out, 3);
        assert_eq!(out, [2, 3, 4], "wraps around, oldest first, at most max");
        r.consume(10);
        assert_eq!((r.len(), r.tail()), (0, 5), "consuming stops at the head");
    }

    #[test]
    fn discarding_counts_as_dropped() {
        let mut r = ring::<8>();
        for x in 0..5 {
            r.push(&x);
        }
        r.discard(3);
        assert_eq!((r.len(), r.dropped()), (2, 3));
        r.discard(100);
        assert_eq!((r.len(), r.dropped()), (0, 5));
    }

    #[test]
    fn fixed_strings_cut_at_a_character_boundary() {
        let s = FixedStr::<4>::new(Some("abé"));
        assert_eq!(s.get(), Some("abé"));
        let s = FixedStr::<3>::new(Some("abé"));
        assert_eq!(s.get(), Some("ab"), "é is two bytes and does not fit");
        assert_eq!(FixedStr::<3>::new(None).get(), None);
        assert_eq!(FixedStr::<3>::EMPTY.get(), None);
    }
}
