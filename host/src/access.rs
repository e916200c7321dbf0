//! Who may do what: users, their tokens and permissions, and the check every server makes
//! before it acts on a request.
//!
//! A cluster's users live in its meta state (`cluster::meta`), so every node enforces the same
//! rules; a user's token is kept only as its SHA-256. A client signs in with the token (Redis
//! `AUTH`/`HELLO ... AUTH`, a QUIC connection's `Authenticate`, an HTTP bearer token) and each
//! request is then checked against the user's permissions *as they are now*: a user deleted or
//! changed meanwhile is refused on connections that signed in before.
//!
//! Until the cluster has its first user, clients on a node's own machine (loopback) may do
//! everything and every other client is refused: a new cluster works at once for `grex dev` and
//! local tools, and is not open to the network before an admin exists.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use grex_client::{Permissions, UserInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, Result, error};

/// The longest user name.
pub const USER_NAME_BYTES_MAX: usize = 64;

/// How a user is stored: its token's hash and its permissions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// SHA-256 of the user's token.
    pub token_sha256: [u8; 32],
    /// What it may do.
    pub permissions: Permissions,
}

/// Every user, by name.
pub type Users = BTreeMap<String, UserRecord>;

/// What a request would do, as permissions name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// See the cluster: status, flock map, members, module names, canaries.
    See,
    /// Read items.
    Read,
    /// Write items directly.
    Write,
    /// Run a job of the module of this name (or `sha256:` id).
    Run(&'a str),
    /// Modules, users and members.
    Admin,
}

impl Action<'_> {
    fn describe(&self) -> String {
        match self {
            Action::See => "see the cluster".into(),
            Action::Read => "read items (it needs the `read` permission)".into(),
            Action::Write => "write items directly (it needs the `write` permission)".into(),
            Action::Run(module) => format!("run jobs of module `{module}` (it needs `run:{module}` or `run:*`)"),
            Action::Admin => "change modules, users or members (it needs `admin`)".into(),
        }
    }
}

/// A signed-in user: its name and the hash of the token it signed in with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub name: String,
    token_sha256: [u8; 32],
}

/// Who sent a request: the user its connection signed in as, if any, and whether it came from
/// the node's own machine.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The user, once signed in.
    pub user: Option<Identity>,
    /// The request came over loopback.
    pub loopback: bool,
}

impl Caller {
    /// A caller that has not signed in, from `remote`.
    pub fn from(remote: SocketAddr) -> Caller {
        Caller { user: None, loopback: is_loopback(remote.ip()) }
    }

    /// The node itself, or an embedding application: signed in as nobody, on loopback.
    pub fn local() -> Caller {
        Caller { user: None, loopback: true }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: `grex_` and 64 hex digits (256 bits from the OS-seeded generator).
pub fn new_token() -> String {
    format!("grex_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// The user `token` belongs to.
pub fn authenticate(users: &Users, token: &str) -> Result<Identity> {
    let hash = token_hash(token);
    // A handful of users: a scan, comparing every hash in full.
    users
        .iter()
        .find(|(_, record)| record.token_sha256 == hash)
        .map(|(name, _)| Identity { name: name.clone(), token_sha256: hash })
        .ok_or_else(|| {
            error(
                ErrorCode::Unauthenticated,
                "the token matches no user (it may have been deleted); ask an admin for one",
            )
        })
}

/// Whether `caller` may do `action` under `users`; the error says what is missing.
pub fn authorize(users: &Users, caller: &Caller, action: Action<'_>) -> Result<()> {
    if users.is_empty() {
        return if caller.loopback {
            Ok(())
        } else {
            Err(error(
                ErrorCode::Unauthenticated,
                "this cluster has no users yet, so it serves only clients on its nodes' own machines; create an \
                 admin there with `grex user add NAME --admin` and sign in with its token",
            ))
        };
    }
    let Some(identity) = &caller.user else {
        return Err(error(
            ErrorCode::Unauthenticated,
            "sign in first: pass a user's token (--token or GREX_TOKEN for the CLI, `Authorization: Bearer TOKEN` \
             over HTTP, AUTH over the Redis protocol)",
        ));
    };
    let record = users.get(&identity.name).filter(|r| r.token_sha256 == identity.token_sha256).ok_or_else(|| {
        error(
            ErrorCode::Unauthenticated,
            format!("user `{}` was deleted (or its token replaced) after this connection signed in", identity.name),
        )
    })?;
    let p = &record.permissions;
    let allowed = match action {
        Action::See => true,
        Action::Read => p.admin || p.read,
        Action::Write => p.admin || p.write,
        Action::Run(module) => p.may_run(module),
        Action::Admin => p.admin,
    };
    if allowed {
        Ok(())
    } else {
        Err(error(
            ErrorCode::Forbidden,
            format!(
                "user `{}` may not {}; an admin can grant it with `grex user set {} ...`",
                identity.name,
                action.describe(),
                identity.name
            ),
        ))
    }
}

/// Refuses a user name that is empty, too long, or has characters other than letters, digits,
/// `-`, `_`, `.` and `@`.
pub fn check_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= USER_NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(error(
            ErrorCode::BadRequest,
            format!("user name `{name}` must be 1 to {USER_NAME_BYTES_MAX} letters, digits, `-`, `_`, `.` or `@`"),
        ))
    }
}

/// Refuses permissions that name a module in a way no module can be named.
pub fn check_permissions(permissions: &Permissions) -> Result<()> {
    for module in &permissions.run {
        if module != "*" && (module.is_empty() || module.len() > 128 || module.chars().any(char::is_whitespace)) {
            return Err(error(
                ErrorCode::BadRequest,
                format!("`run:{module}` names no module; use a module name or `*`"),
            ));
        }
    }
    Ok(())
}

/// A change to the users, as a node asks the meta group's leader for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserChange {
    /// A new user, with its token's hash (the token itself stays with the node that made it).
    Add {
        /// Its name.
        name: String,
        /// Its record.
        record: UserRecord,
    },
    /// New permissions for a user.
    Set {
        /// Its name.
        name: String,
        /// What it may do from now on.
        permissions: Permissions,
    },
    /// A user goes.
    Delete {
        /// Its name.
        name: String,
    },
}

impl UserChange {
    /// The user it changes.
    pub fn name(&self) -> &str {
        match self {
            UserChange::Add { name, .. } | UserChange::Set { name, .. } | UserChange::Delete { name } => name,
        }
    }

    /// Checks the change against the users as they are (on the meta leader, before it is
    /// written): names and permissions well formed, no second user of a name, no change to a
    /// missing user, and an admin always left while there are users (else nobody could manage
    /// them).
    pub fn check(&self, users: &Users) -> Result<()> {
        check_user_name(self.name())?;
        let admins_after = |name: &str, admin: bool| {
            users.iter().filter(|(n, r)| n.as_str() != name && r.permissions.admin).count() + usize::from(admin)
        };
        match self {
            UserChange::Add { name, record } => {
                check_permissions(&record.permissions)?;
                if users.contains_key(name) {
                    return Err(error(
                        ErrorCode::Conflict,
                        format!("user `{name}` exists; change it with `grex user set`, or delete it first"),
                    ));
                }
                if users.is_empty() && !record.permissions.admin {
                    return Err(error(
                        ErrorCode::Conflict,
                        "the first user must be an admin (add it with --admin), or nobody could manage users",
                    ));
                }
            }
            UserChange::Set { name, permissions } => {
                check_permissions(permissions)?;
                missing(users, name)?;
                if admins_after(name, permissions.admin) == 0 {
                    return Err(error(
                        ErrorCode::Conflict,
                        format!("`{name}` is the last admin; make another user an admin first"),
                    ));
                }
            }
            UserChange::Delete { name } => {
                missing(users, name)?;
                if users.len() > 1 && admins_after(name, false) == 0 {
                    return Err(error(
                        ErrorCode::Conflict,
                        format!("`{name}` is the last admin and other users remain; make another user an admin first"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies the change (checked before it was written; applied as written, the same on every
    /// node).
    pub fn apply(self, users: &mut Users) {
        match self {
            UserChange::Add { name, record } => {
                users.entry(name).or_insert(record);
            }
            UserChange::Set { name, permissions } => {
                if let Some(record) = users.get_mut(&name) {
                    record.permissions = permissions;
                }
            }
            UserChange::Delete { name } => {
                users.remove(&name);
            }
        }
    }

    /// Whether `users` shows the change made (so the node that asked for it answers only then).
    pub fn is_applied(&self, users: &Users) -> bool {
        match self {
            UserChange::Add { name, record } => users.get(name) == Some(record),
            UserChange::Set { name, permissions } => users.get(name).is_some_and(|r| r.permissions == *permissions),
            UserChange::Delete { name } => !users.contains_key(name),
        }
    }
}

fn missing(users: &Users, name: &str) -> Result<()> {
    if users.contains_key(name) {
        Ok(())
    } else {
        Err(error(ErrorCode::UserNotFound, format!("no user is named `{name}`; `grex user ls` lists them")))
    }
}

/// The users as clients see them (without their tokens' hashes).
pub fn user_list(users: &Users) -> Vec<UserInfo> {
    users.iter().map(|(name, r)| UserInfo { name: name.clone(), permissions: r.permissions.clone() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(permissions: Permissions) -> (String, UserRecord) {
        let token = new_token();
        let record = UserRecord { token_sha256: token_hash(&token), permissions };
        (token, record)
    }

    fn signed_in(users: &Users, token: &str) -> Caller {
        Caller { user: Some(authenticate(users, token).unwrap()), loopback: false }
    }

    #[test]
    fn without_users_only_loopback_callers_are_served() {
        let users = Users::new();
        assert!(authorize(&users, &Caller::local(), Action::Admin).is_ok());
        let remote = Caller::from("10.0.0.7:5000".parse().unwrap());
        assert_eq!(authorize(&users, &remote, Action::See).unwrap_err().code, ErrorCode::Unauthenticated);
        let mapped = Caller::from("[::ffff:127.0.0.1]:5000".parse().unwrap());
        assert!(mapped.loopback, "an IPv4 loopback address mapped into IPv6 is loopback");
    }

    #[test]
    fn each_permission_allows_exactly_its_actions() {
        let mut users = Users::new();
        let (admin_token, admin) = user(Permissions::admin());
        let (reader_token, reader) = user(Permissions { read: true, ..Permissions::default() });
        let (runner_token, runner) = user(Permissions { run: vec!["counter".into()], ..Permissions::default() });
        users.insert("root".into(), admin);
        users.insert("reader".into(), reader);
        users.insert("runner".into(), runner);
        let actions =
            [Action::See, Action::Read, Action::Write, Action::Run("counter"), Action::Run("ledger"), Action::Admin];
        let allowed = |token: &str| -> Vec<bool> {
            let caller = signed_in(&users, token);
            actions.iter().map(|a| authorize(&users, &caller, *a).is_ok()).collect()
        };
        assert_eq!(allowed(&admin_token), [true; 6]);
        assert_eq!(allowed(&reader_token), [true, true, false, false, false, false]);
        assert_eq!(allowed(&runner_token), [true, false, false, true, false, false]);
        let refused = authorize(&users, &signed_in(&users, &runner_token), Action::Admin).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
        assert!(refused.message.contains("runner"), "{}", refused.message);
        // Loopback is no way around the users once there are some.
        assert_eq!(authorize(&users, &Caller::local(), Action::See).unwrap_err().code, ErrorCode::Unauthenticated);
        assert_eq!(authenticate(&users, "grex_00").unwrap_err().code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn a_deleted_user_is_refused_on_a_connection_that_signed_in_before() {
        let mut users = Users::new();
        let (token, record) = user(Permissions::admin());
        users.insert("root".into(), record);
        let (_, other) = user(Permissions::admin());
        users.insert("other".into(), other);
        let caller = signed_in(&users, &token);
        UserChange::Delete { name: "root".into() }.apply(&mut users);
        assert_eq!(authorize(&users, &caller, Action::See).unwrap_err().code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn changes_keep_an_admin_and_refuse_what_does_not_fit() {
        let mut users = Users::new();
        let (_, reader) = user(Permissions { read: true, ..Permissions::default() });
        let add_reader = UserChange::Add { name: "reader".into(), record: reader.clone() };
        assert_eq!(add_reader.check(&users).unwrap_err().code, ErrorCode::Conflict, "the first user is an admin");
        let (_, admin) = user(Permissions::admin());
        let add_admin = UserChange::Add { name: "root".into(), record: admin };
        add_admin.check(&users).unwrap();
        add_admin.clone().apply(&mut users);
        assert!(add_admin.is_applied(&users));
        assert_eq!(add_admin.check(&users).unwrap_err().code, ErrorCode::Conflict, "one user per name");
        add_reader.check(&users).unwrap();
        add_reader.apply(&mut users);
        let demote = UserChange::Set { name: "root".into(), permissions: Permissions::default() };
        assert_eq!(demote.check(&users).unwrap_err().code, ErrorCode::Conflict);
        let delete_root = UserChange::Delete { name: "root".into() };
        assert_eq!(delete_root.check(&users).unwrap_err().code, ErrorCode::Conflict);
        let delete_ghost = UserChange::Delete { name: "ghost".into() };
        assert_eq!(delete_ghost.check(&users).unwrap_err().code, ErrorCode::UserNotFound);
        let bad_name = UserChange::Delete { name: "a b".into() };
        assert_eq!(bad_name.check(&users).unwrap_err().code, ErrorCode::BadRequest);
        UserChange::Delete { name: "reader".into() }.apply(&mut users);
        delete_root.check(&users).expect("the last user may go: the cluster is back to loopback only");
    }
}
