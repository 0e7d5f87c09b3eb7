//! How much of the admitted work is handed to the Kafka producer at once, and in which order.
//!
//! librdkafka's queue is first-in first-out: a record produced now waits behind every record
//! already queued, whoever sent them. Admission ([`crate::admission`]) bounds what a flooding
//! agent may have *admitted*, but while all of that sits in librdkafka's queue, another
//! workspace's batch still waits behind it — hundreds of milliseconds behind a share of 5,000
//! actions (bench/README.md, "Fairness"). So admitted batches do not go to the producer
//! directly: each first takes room in a **window** of at most
//! [`IngestConfig::producer_window_actions`] actions handed to the producer and not yet
//! acknowledged. When the window is full, waiting batches are granted room **round robin by
//! workspace**, one batch per workspace per turn (first come, first served within a workspace).
//! A workspace that sends now and then finds at most one batch of each busy workspace ahead of
//! it, plus the window itself, however much the others have admitted.
//!
//! A batch is granted whole (one larger than the window is granted once the window is empty),
//! so its records stay together and it never waits for a part of itself. A turn is never
//! skipped for a later, smaller batch: the batch at the head of the turn waits until it fits,
//! so large batches are not starved. The state is one `std::sync::Mutex` held for a few queue
//! operations (never across an `.await`); a waiter that goes away (the client disconnected)
//! gives its room back, whether it was granted yet or not.
//!
//! [`IngestConfig::producer_window_actions`]: crate::config::IngestConfig::producer_window_actions

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Room in the window for one batch; given back when dropped.
#[derive(Debug)]
#[must_use = "the room is given back when this is dropped"]
pub struct WindowRoom {
    /// `None` only for room taken back while the state is locked (see `grant_in_turn`).
    window: Option<Arc<Shared>>,
    actions: usize,
}

impl Drop for WindowRoom {
    fn drop(&mut self) {
        if let Some(window) = self.window.take() {
            let mut state = window.lock();
            state.available += self.actions;
            state.grant_in_turn(&window);
        }
    }
}

/// The window and its waiting batches; cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct ProducerWindow {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct Waiter {
    actions: usize,
    granted: oneshot::Sender<WindowRoom>,
}

#[derive(Debug, Default)]
struct State {
    available: usize,
    /// Waiting batches per workspace, first come first served.
    waiting: HashMap<String, VecDeque<Waiter>>,
    /// Workspaces with waiting batches, in turn order; each appears once.
    turns: VecDeque<String>,
    /// Actions of all waiting batches.
    waiting_actions: usize,
}

impl ProducerWindow {
    /// A window of `capacity` actions (at least 1).
    pub fn new(capacity: usize) -> ProducerWindow {
        let capacity = capacity.max(1);
        ProducerWindow {
            shared: Arc::new(Shared {
                capacity,
                state: Mutex::new(State {
                    available: capacity,
                    ..State::default()
                }),
            }),
        }
    }

    /// Waits for room for a batch of `actions` of `workspace`. Granted at once when nothing is
    /// waiting and the batch fits; otherwise in the workspace's turn.
    pub async fn enter(&self, workspace: &str, actions: usize) -> WindowRoom {
        // A batch larger than the window is granted alone, when the window is empty.
        let actions = actions.clamp(1, self.shared.capacity);
        let receiver = {
            let mut state = self.shared.lock();
            if state.turns.is_empty() && state.available >= actions {
                state.available -= actions;
                return WindowRoom {
                    window: Some(self.shared.clone()),
                    actions,
                };
            }
            let (granted, receiver) = oneshot::channel();
            let queue = state.waiting.entry(workspace.to_string()).or_default();
            if queue.is_empty() {
                state.turns.push_back(workspace.to_string());
            }
            state
                .waiting
                .get_mut(workspace)
                .expect("inserted above")
                .push_back(Waiter { actions, granted });
            state.waiting_actions += actions;
            // Room may be free while others wait (a waiter went away): hand it out now.
            state.grant_in_turn(&self.shared);
            receiver
        };
        match receiver.await {
            Ok(room) => room,
            // The sender is only dropped after sending or when the waiter is gone; the window
            // itself lives as long as `self`.
            Err(_) => unreachable!("a producer window waiter is never dropped unanswered"),
        }
    }

    /// Actions of the batches waiting for room.
    pub fn waiting_actions(&self) -> usize {
        self.shared.lock().waiting_actions
    }

    /// Actions handed to the producer and not yet acknowledged.
    pub fn actions_in_window(&self) -> usize {
        let state = self.shared.lock();
        self.shared.capacity - state.available
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few steps that leave the state consistent, even after a panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Grants room to waiting batches, one per workspace per turn, while the batch whose turn
    /// it is fits.
    fn grant_in_turn(&mut self, shared: &Arc<Shared>) {
        while let Some(workspace) = self.turns.front().cloned() {
            let queue = self
                .waiting
                .get_mut(&workspace)
                .expect("a workspace in turn has waiting batches");
            let head_actions = queue.front().expect("queues in turn are not empty").actions;
            if head_actions > self.available {
                return;
            }
            let waiter = queue.pop_front().expect("checked above");
            let queue_now_empty = queue.is_empty();
            self.turns.pop_front();
            if queue_now_empty {
                self.waiting.remove(&workspace);
            } else {
                self.turns.push_back(workspace);
            }
            self.waiting_actions -= waiter.actions;
            self.available -= waiter.actions;
            let room = WindowRoom {
                window: Some(shared.clone()),
                actions: waiter.actions,
            };
            if let Err(mut room) = waiter.granted.send(room) {
                // The waiter went away: take the room back here, since its Drop would lock the
                // state this holds.
                self.available += room.actions;
                room.window = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `future` once; `Some` when it is ready at once.
    fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
        let waker = futures::task::noop_waker();
        let mut context = std::task::Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn batches_that_fit_are_granted_at_once_and_room_comes_back_on_drop() {
        let window = ProducerWindow::new(100);
        let first = window.enter("ws_a", 60).await;
        let second = window.enter("ws_b", 40).await;
        assert_eq!(window.actions_in_window(), 100);
        drop(first);
        assert_eq!(window.actions_in_window(), 40);
        drop(second);
        assert_eq!(window.actions_in_window(), 0);
    }

    #[tokio::test]
    async fn a_quiet_workspace_is_served_before_the_backlog_of_a_flooding_one() {
        let window = ProducerWindow::new(100);
        let held = window.enter("flood", 100).await;
        let (order_sender, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        // The flood queues five batches, then the quiet workspace one.
        for (index, workspace) in ["flood", "flood", "flood", "flood", "flood", "quiet"]
            .into_iter()
            .enumerate()
        {
            let task_window = window.clone();
            let order_sender = order_sender.clone();
            waiting.push(tokio::spawn(async move {
                let room = task_window.enter(workspace, 100).await;
                order_sender.send((index, workspace)).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(room);
            }));
            // Queue them in this order.
            while window.waiting_actions() < (index + 1) * 100 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(window.waiting_actions(), 600);
        drop(held);
        for task in waiting {
            task.await.unwrap();
        }
        let mut served = Vec::new();
        while let Ok(entry) = order.try_recv() {
            served.push(entry);
        }
        // Round robin: the flood's first waiting batch, then the quiet one, then the flood.
        assert_eq!(
            served,
            vec![
                (0, "flood"),
                (5, "quiet"),
                (1, "flood"),
                (2, "flood"),
                (3, "flood"),
                (4, "flood"),
            ]
        );
        assert_eq!(window.actions_in_window(), 0);
    }

    #[tokio::test]
    async fn a_large_batch_at_the_head_is_not_overtaken_by_smaller_ones() {
        let window = ProducerWindow::new(100);
        let held = window.enter("ws_a", 50).await;
        let large = {
            let window = window.clone();
            tokio::spawn(async move { window.enter("ws_b", 80).await })
        };
        while window.waiting_actions() < 80 {
            tokio::task::yield_now().await;
        }
        // 50 are free, but the large batch is first in turn: the small one waits behind it.
        assert!(ready_now(window.enter("ws_c", 10)).is_none());
        drop(held);
        let large = large.await.unwrap();
        assert_eq!(window.actions_in_window(), 80);
        drop(large);
        assert_eq!(window.actions_in_window(), 0);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_window_is_granted_alone() {
        let window = ProducerWindow::new(10);
        let room = window.enter("ws_a", 500).await;
        assert_eq!(window.actions_in_window(), 10);
        assert!(ready_now(window.enter("ws_b", 1)).is_none());
        drop(room);
        let _small = window.enter("ws_b", 1).await;
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_gives_its_room_back() {
        let window = ProducerWindow::new(10);
        let held = window.enter("ws_a", 10).await;
        // Queued, then abandoned before its turn (a client that disconnected).
        assert!(ready_now(window.enter("ws_b", 5)).is_none());
        assert_eq!(window.waiting_actions(), 5);
        drop(held);
        assert_eq!(window.waiting_actions(), 0);
        assert_eq!(window.actions_in_window(), 0);
        let _all = window.enter("ws_c", 10).await;
    }
}
