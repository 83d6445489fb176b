//! Where jobs come from. Each intake turns its transport into message bodies for
//! [`crate::job::JobSpec::parse`] and knows how to acknowledge them; none of them runs jobs.

pub mod socket;
pub mod sqs;
