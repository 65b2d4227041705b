//! Operator API tokens: creation, listing and revocation. They are never cached: every
//! request looks its token up in the store, so a revocation is immediate everywhere.

use super::{Coordinator, ServiceError};
use shared::domain::{ApiTokenListing, ApiTokenRecord, Role};
use shared::{now_ms, token};

impl Coordinator {
    /// Creates an operator API token; returns its text (shown once, only the hash is kept)
    /// and record. Names are unique for good (see [`ApiTokenRecord`]): the check here gives a
    /// clear error, the database's unique index settles races.
    pub async fn create_api_token(
        &self,
        name: String,
        role: Role,
        author: &str,
    ) -> Result<(String, ApiTokenRecord), ServiceError> {
        if name.is_empty() {
            return Err(ServiceError::Invalid("an api token needs a name".into()));
        }
        let taken = self
            .store
            .list_api_tokens()
            .await?
            .iter()
            .any(|t| t.token.name == name);
        if taken {
            return Err(ServiceError::Invalid(format!(
                "an api token named `{name}` exists already (names are never reused)"
            )));
        }
        let text = token::new_api_token();
        let rec = ApiTokenRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            name,
            role,
            hash: token::hash_token(&text),
            created_ms: now_ms(),
        };
        self.store.create_api_token(&rec).await?;
        self.audit_op(
            author,
            "api_token.create",
            None,
            serde_json::json!({ "api_token_id": rec.id, "name": rec.name, "role": rec.role }),
        )
        .await?;
        Ok((text, rec))
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenListing>, ServiceError> {
        Ok(self.store.list_api_tokens().await?)
    }

    /// Revokes an API token: every coordinator refuses it from the next request on, since API
    /// tokens are looked up in the store on every request and never cached. The last live
    /// admin token cannot be revoked, so the API is not locked out by accident. (The check
    /// reads, then writes: two admins revoking each other at the same instant can still both
    /// succeed.)
    pub async fn revoke_api_token(&self, id: &str, author: &str) -> Result<(), ServiceError> {
        let tokens = self.store.list_api_tokens().await?;
        let Some(target) = tokens.iter().find(|t| t.token.id == id) else {
            return Err(ServiceError::NotFound(format!("api token {id}")));
        };
        let live_admins = tokens
            .iter()
            .filter(|t| t.token.role == Role::Admin && t.revoked_ms.is_none())
            .count();
        if target.token.role == Role::Admin && target.revoked_ms.is_none() && live_admins <= 1 {
            return Err(ServiceError::Invalid(
                "cannot revoke the last admin api token".into(),
            ));
        }
        if !self.store.revoke_api_token(id, now_ms()).await? {
            return Err(ServiceError::NotFound(format!("api token {id}")));
        }
        self.audit_op(
            author,
            "api_token.revoke",
            None,
            serde_json::json!({ "api_token_id": id, "name": target.token.name }),
        )
        .await?;
        Ok(())
    }
}
