//! Last-use updates as the event writer applies them. Backends queue a use when they have not
//! seen one of the token within `token.last_used_interval`; several backends may queue the same
//! token within one batch. The writer applies one update per token: its latest use, under the
//! smallest interval any queuing session asked for (so `last_used_at` moves at most once per
//! interval per token and never backwards), in token-id order, so that its probes of the
//! primary key walk the index from one end to the other instead of at random. Pure: no Postgres.

/// One queued use: the token's id, when (microseconds), the interval (seconds) its session set.
pub type Use = ([u8; 16], i64, i32);

/// One use per token, the latest, with the smallest interval; sorted by token id.
pub fn coalesce(uses: &mut Vec<Use>) {
    uses.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    uses.dedup_by(|later, kept| {
        if later.0 != kept.0 {
            return false;
        }
        kept.1 = kept.1.max(later.1);
        kept.2 = kept.2.min(later.2);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> [u8; 16] {
        let mut i = [0u8; 16];
        i[0] = n;
        i[15] = 255 - n;
        i
    }

    #[test]
    fn one_use_per_token_the_latest_under_the_smallest_interval_in_id_order() {
        let mut uses = vec![(id(9), 10, 60), (id(3), 50, 60), (id(9), 30, 3600), (id(3), 40, 5), (id(5), 1, 60), (id(9), 20, 60)];
        coalesce(&mut uses);
        assert_eq!(uses, vec![(id(3), 50, 5), (id(5), 1, 60), (id(9), 30, 60)]);
    }

    #[test]
    fn nothing_and_one_stay_as_they_are() {
        let mut none: Vec<Use> = Vec::new();
        coalesce(&mut none);
        assert!(none.is_empty());
        let mut one = vec![(id(1), -5, 0)];
        coalesce(&mut one);
        assert_eq!(one, vec![(id(1), -5, 0)]);
    }

    #[test]
    fn a_large_batch_keeps_every_token_once() {
        // 2,048 uses (the writer's batch) of 300 tokens in a scrambled order.
        let mut uses: Vec<Use> = (0..2048u32).map(|i| (id((i * 7919 % 300 % 251) as u8), i64::from(i), 60)).collect();
        let distinct: std::collections::HashSet<[u8; 16]> = uses.iter().map(|u| u.0).collect();
        let latest = |t: [u8; 16], u: &[Use]| u.iter().filter(|x| x.0 == t).map(|x| x.1).max();
        let before = uses.clone();
        coalesce(&mut uses);
        assert_eq!(uses.len(), distinct.len());
        assert!(uses.windows(2).all(|w| w[0].0 < w[1].0), "sorted, no token twice");
        assert!(uses.iter().all(|u| Some(u.1) == latest(u.0, &before)));
    }
}
