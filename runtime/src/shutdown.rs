//! Shutdown as a value: SIGTERM or Ctrl-C flips a watch channel that every task can await.
//! A second Ctrl-C forces exit.

use tokio::sync::watch;

/// A cloneable handle that resolves once shutdown has been requested.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// The sending side: whoever owns it decides when to shut down.
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

impl Shutdown {
    /// A trigger and its first handle.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger { sender }, Shutdown { receiver })
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves when shutdown is requested (at once if it already was).
    pub async fn requested(&mut self) {
        // An error means the trigger was dropped, which also means: stop.
        let _ = self.receiver.wait_for(|requested| *requested).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.sender.send(true);
    }

    pub fn handle(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

/// A [`Shutdown`] that fires on SIGTERM or Ctrl-C; a second signal exits the process at once.
pub fn on_signals() -> Shutdown {
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining (send the signal again to force exit)");
        trigger.trigger();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    shutdown
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_trigger() {
        let (trigger, mut first) = Shutdown::new();
        let mut second = trigger.handle();
        assert!(!first.is_requested());
        trigger.trigger();
        first.requested().await;
        second.requested().await;
        assert!(second.is_requested());
    }
}
