//! Who is signed in, as every page renders it: the operator's actor name, role and CSRF
//! secret. A leaf, so the layout and the sign-in code both use it without using each other.

use std::marker::PhantomData;

use shared::domain::Role;

/// A signed-in operator holding at least role `R`.
pub struct Signed<R = ()> {
    /// `api:<API token name>`, as the API's audit rows name it.
    pub actor: String,
    pub role: Role,
    pub csrf: String,
    pub(super) secret: String,
    pub(super) role_needed: PhantomData<R>,
}

impl<R> Signed<R> {
    /// The same operator, with the role type forgotten (for rendering).
    pub fn any(&self) -> Signed {
        Signed {
            actor: self.actor.clone(),
            role: self.role,
            csrf: self.csrf.clone(),
            secret: self.secret.clone(),
            role_needed: PhantomData,
        }
    }

    pub fn may(&self, role: Role) -> bool {
        self.role >= role
    }
}
