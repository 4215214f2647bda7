//! Group commit: concurrent Commit and Charge calls share PostgreSQL
//! transactions.
//!
//! Each call hands its usage event to a queue and waits. A few writer tasks
//! take whatever is queued (up to `max_batch`), write it with one
//! statement, and answer every caller of the batch. Under load, batches
//! grow and the cost of a WAL flush is shared; idle, a lone event is
//! written at once.
//!
//! One bad member never fails the others: when a batch fails with an
//! error that is not transient (a data error, a constraint: anything a
//! retry of the same statement would hit again), each member is written
//! again on its own, so each caller gets its own outcome and only the bad
//! event fails. A transient error (connection lost, timeout) fails the
//! whole batch, and every caller is told to retry.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::pg::{Inserted, NewEvent, PgError, PgStore};

type Reply = oneshot::Sender<Result<Inserted, Arc<PgError>>>;

#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<(NewEvent, Reply)>,
}

impl Committer {
    pub fn start(pg: PgStore, max_batch: usize, writers: usize) -> Self {
        let (queue, receiver) = mpsc::channel::<(NewEvent, Reply)>(max_batch * writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            let receiver = receiver.clone();
            let pg = pg.clone();
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    {
                        let mut rx = receiver.lock().await;
                        match rx.recv().await {
                            Some(job) => batch.push(job),
                            None => return,
                        }
                        while batch.len() < max_batch {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    write_batch(&pg, batch).await;
                }
            });
        }
        Committer { queue }
    }

    /// Writes one event durably (with whatever else is queued).
    pub async fn write(&self, event: NewEvent) -> Result<Inserted, Arc<PgError>> {
        let (tx, rx) = oneshot::channel();
        let closed = || Arc::new(PgError::Db(sqlx::Error::PoolClosed));
        self.queue.send((event, tx)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn write_batch(pg: &PgStore, batch: Vec<(NewEvent, Reply)>) {
    let (events, replies): (Vec<NewEvent>, Vec<Reply>) = batch.into_iter().unzip();
    tracing::trace!(size = events.len(), "group commit");
    let started = std::time::Instant::now();
    let written = pg.insert_events(&events).await;
    let m = crate::metrics::metrics();
    m.commit_batch.observe(events.len() as f64);
    m.commit_write.observe(started.elapsed().as_secs_f64());
    match written {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) if e.is_transient() || events.len() == 1 => {
            tracing::warn!(error = %e, size = events.len(), "group commit failed");
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, size = events.len(), "group commit failed; writing its events one by one");
            for (event, reply) in events.into_iter().zip(replies) {
                let result = pg.insert_events(std::slice::from_ref(&event)).await;
                let result = match result {
                    Ok(mut one) => one.pop().ok_or_else(|| PgError::Db(sqlx::Error::RowNotFound)),
                    Err(e) => Err(e),
                };
                if let Err(e) = &result {
                    tracing::warn!(error = %e, event = %event.event_id, tenant = %event.tenant_id, "usage event refused");
                }
                let _ = reply.send(result.map_err(Arc::new));
            }
        }
    }
}
