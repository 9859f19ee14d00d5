//! Task tokens: the `.waitForTaskToken` pattern. A Task state whose resource ends in
//! `.waitForTaskToken` gets a token in `$$.Task.Token`, invokes its resource with it, and then
//! waits until someone holding the token answers: `SendTaskSuccess` (the state's result),
//! `SendTaskFailure` (its error) — or its TimeoutSeconds passes (`States.Timeout`).
//!
//! The answers fail as Step Functions' do: `TaskDoesNotExist` for a token no task waits on
//! (never issued, or already answered), `TaskTimedOut` for one whose task timed out.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde_json::Value as Json;
use tokio::sync::oneshot;

use super::StateError;

/// Why an answer to a token was refused, named as Step Functions names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("TaskDoesNotExist: no task waits on this token")]
    TaskDoesNotExist,
    #[error("TaskTimedOut: the task of this token timed out")]
    TaskTimedOut,
}

impl TokenError {
    /// The error code, as AWS answers it.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TaskDoesNotExist => "TaskDoesNotExist",
            TokenError::TaskTimedOut => "TaskTimedOut",
        }
    }
}

type Answer = Result<Json, StateError>;

/// The tokens of the Task states now waiting on one, shared by every execution of an engine.
#[derive(Debug, Default)]
pub struct TaskTokens {
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    timed_out: Mutex<HashSet<String>>,
}

impl TaskTokens {
    /// A new token, and where its answer arrives. The token is forgotten when the ticket is
    /// dropped: when its task ends, however it ends (answered, timed out, or its execution
    /// stopped or its branch abandoned while it waited).
    pub(crate) fn issue(&self) -> (Ticket<'_>, oneshot::Receiver<Answer>) {
        let token = format!(
            "kiln-task-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let (tx, rx) = oneshot::channel();
        self.lock_waiting().insert(token.clone(), tx);
        (
            Ticket {
                tokens: self,
                token,
                timed_out: false,
            },
            rx,
        )
    }

    /// The task of `token` gave up waiting (timed out, or its execution ended).
    fn expire(&self, token: &str, timed_out: bool) {
        if self.lock_waiting().remove(token).is_some() && timed_out {
            self.timed_out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(token.to_string());
        }
    }

    /// `SendTaskSuccess`: the waiting task succeeds with `output` as its result.
    pub fn succeed(&self, token: &str, output: Json) -> Result<(), TokenError> {
        self.answer(token, Ok(output))
    }

    /// `SendTaskFailure`: the waiting task fails with `error` and `cause`.
    pub fn fail(&self, token: &str, error: &str, cause: &str) -> Result<(), TokenError> {
        self.answer(token, Err(StateError::new(error, cause)))
    }

    /// How many tasks wait on a token now.
    pub fn waiting(&self) -> usize {
        self.lock_waiting().len()
    }

    fn answer(&self, token: &str, answer: Answer) -> Result<(), TokenError> {
        let sender = self.lock_waiting().remove(token);
        match sender {
            // A receiver dropped in the meantime is a task that stopped waiting.
            Some(tx) => tx.send(answer).map_err(|_| TokenError::TaskDoesNotExist),
            None if self
                .timed_out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(token) =>
            {
                Err(TokenError::TaskTimedOut)
            }
            None => Err(TokenError::TaskDoesNotExist),
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Answer>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A token a task waits on (see [`TaskTokens::issue`]).
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    tokens: &'a TaskTokens,
    token: String,
    timed_out: bool,
}

impl Ticket<'_> {
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The task timed out: a later answer is told `TaskTimedOut`.
    pub(crate) fn timed_out(&mut self) {
        self.timed_out = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.tokens.expire(&self.token, self.timed_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_token_is_answered_once_and_a_stale_one_is_named() {
        let t = TaskTokens::default();
        let (ticket, rx) = t.issue();
        let token = ticket.token().to_string();
        assert_eq!(t.waiting(), 1);
        t.succeed(&token, json!({"state": "running"})).unwrap();
        assert_eq!(rx.await.unwrap().unwrap(), json!({"state": "running"}));
        assert_eq!(
            t.succeed(&token, json!({})),
            Err(TokenError::TaskDoesNotExist)
        );
        drop(ticket);
        assert_eq!(
            t.fail("never-issued", "E", "c"),
            Err(TokenError::TaskDoesNotExist)
        );
        let (mut late, _rx) = t.issue();
        let token = late.token().to_string();
        late.timed_out();
        drop(late);
        assert_eq!(t.succeed(&token, json!({})), Err(TokenError::TaskTimedOut));
        // A task dropped while it waits (its execution stopped) forgets its token.
        let (abandoned, _rx) = t.issue();
        assert_eq!(t.waiting(), 1);
        drop(abandoned);
        assert_eq!(t.waiting(), 0);
    }
}
