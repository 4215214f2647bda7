//! The outcome types of the hot path, shared by the store, the service and
//! the gRPC edge.

use chrono::{DateTime, Utc};

use crate::domain::Credits;

/// Why a reservation was not granted (mirrors `creditd.v1.DenialReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialReason {
    InsufficientCredits,
    CapReached,
    AccountSuspended,
}

impl DenialReason {
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "INSUFFICIENT_CREDITS" => Some(Self::InsufficientCredits),
            "CAP_REACHED" => Some(Self::CapReached),
            "ACCOUNT_SUSPENDED" => Some(Self::AccountSuspended),
            _ => None,
        }
    }
}

/// A normal "no".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenialReason,
    pub account_id: String,
    pub available: Credits,
    pub retry_after: Option<DateTime<Utc>>,
}

impl Denial {
    pub fn message(&self) -> String {
        match self.reason {
            DenialReason::InsufficientCredits => {
                format!("not enough credits: {} available through account {}", self.available, self.account_id)
            }
            DenialReason::CapReached => format!(
                "the period cap of account {} is reached: {} available until the next period",
                self.account_id, self.available
            ),
            DenialReason::AccountSuspended => format!("account {} is suspended", self.account_id),
        }
    }
}

/// The state of a reservation that can no longer be committed or released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldState {
    Committing,
    Committed,
    Released,
    Expired,
    /// Its commit was reverted: no usage event was recorded before the
    /// commit's deadline, so the charge was undone.
    Reverted,
}

impl HoldState {
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "committing" => Some(Self::Committing),
            "committed" => Some(Self::Committed),
            "released" => Some(Self::Released),
            "reverted" => Some(Self::Reverted),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}
