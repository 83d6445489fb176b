//! The unprivileged user a job runs as (`[jobs] user`).
//!
//! A job never runs as root and never as the agent's own user: a job under the agent's uid
//! could drain the agent, stop a sibling through its owner's socket or forge its own exit
//! record. The process that starts the job (the job's owner) drops to this user between
//! fork and exec, after the job is in its cgroup and before `PR_SET_PDEATHSIG` is set (a
//! credential change clears it): supplementary groups, then gid, then uid, then the ambient
//! capabilities the owner unit gave the owner.
//!
//! Owns: looking the user up and the rules on who it may be. Must not touch: when the drop
//! happens (see `supervisor::build_command`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A resolved job user. Travels in the owner's job file; the owner looks the name up again
/// and refuses a record that does not match the host's user database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The user's supplementary groups (its primary group included).
    pub groups: Vec<u32>,
    /// `HOME` of the job (the AWS CLI and rsql read their config from it).
    pub home: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobUserError {
    #[error("[jobs] user {name:?} does not exist on this host (the packages create rsql-job; `useradd --system {name}` makes it)")]
    Unknown { name: String },
    #[error("cannot look up [jobs] user {name:?}: {reason}")]
    Lookup { name: String, reason: String },
    #[error("[jobs] user {name:?} is root (uid 0); jobs never run as root")]
    Root { name: String },
    #[error("[jobs] user {name:?} is the agent's own user (uid {uid}); a job under the agent's uid could control the agent and other jobs: give jobs a user of their own")]
    AgentsOwn { name: String, uid: u32 },
    #[error("[jobs] user is {name:?}, but the job owner units run jobs only as {allowed:?}: set RSQL_JOB_USER={name} in /etc/rsql-agent/environment (both units read it), or [jobs] user = {allowed:?}")]
    NotTheOwnersUser { name: String, allowed: String },
    #[error("[jobs] user {name:?} is in group {gid} (root's or the agent's); a job's user must belong to neither")]
    PrivilegedGroup { name: String, gid: u32 },
    #[error("the job file names user {name:?} as uid {recorded}, but this host says uid {found}")]
    Mismatch {
        name: String,
        recorded: u32,
        found: u32,
    },
}

impl JobUser {
    /// Looks `name` up in the host's user database. Root is refused.
    pub fn resolve(name: &str) -> Result<JobUser, JobUserError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| JobUserError::Lookup {
                name: name.to_string(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| JobUserError::Unknown {
                name: name.to_string(),
            })?;
        if user.uid.is_root() {
            return Err(JobUserError::Root {
                name: name.to_string(),
            });
        }
        let cname = std::ffi::CString::new(name).map_err(|e| JobUserError::Lookup {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|_| vec![user.gid.as_raw()]);
        Ok(JobUser {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
        })
    }

    /// [`JobUser::resolve`], refusing also the uid of this process (the agent's, or the
    /// owner's): a job must not be able to signal or impersonate what supervises it.
    pub fn resolve_for_jobs(name: &str) -> Result<JobUser, JobUserError> {
        let user = JobUser::resolve(name)?;
        let me = nix::unistd::geteuid().as_raw();
        if user.uid == me {
            return Err(JobUserError::AgentsOwn {
                name: user.name,
                uid: me,
            });
        }
        // A group of root's, or of the agent's, would hand the job their files.
        let my_group = nix::unistd::getegid().as_raw();
        if let Some(&gid) = user
            .groups
            .iter()
            .chain([&user.gid])
            .find(|&&g| g == 0 || (g == my_group && my_group != 0))
        {
            return Err(JobUserError::PrivilegedGroup {
                name: user.name,
                gid,
            });
        }
        Ok(user)
    }

    /// The owner's check of a job file's record: the name still resolves to the same ids,
    /// and not to root or to the owner's own uid.
    pub fn verify(&self) -> Result<JobUser, JobUserError> {
        let found = JobUser::resolve_for_jobs(&self.name)?;
        if found.uid != self.uid {
            return Err(JobUserError::Mismatch {
                name: self.name.clone(),
                recorded: self.uid,
                found: found.uid,
            });
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_never_a_job_user() {
        assert_eq!(
            JobUser::resolve("root"),
            Err(JobUserError::Root {
                name: "root".into()
            })
        );
    }

    #[test]
    fn an_unknown_user_is_named_in_the_error() {
        let e = JobUser::resolve("no-such-user-rsql").unwrap_err();
        assert!(e.to_string().contains("no-such-user-rsql"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn nobody_resolves_with_its_groups() {
        let user = JobUser::resolve("nobody").expect("nobody exists on Debian");
        assert_ne!(user.uid, 0);
        assert!(user.groups.contains(&user.gid), "{user:?}");
    }
}
