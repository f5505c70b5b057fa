//! The customer domain: customers with their addresses, auth identities, and the outbox of
//! events held until a run's outcome is known. Shapes follow Medusa's DTOs.
//!
//! All SQL of the domain is in [`store`].

pub mod store;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::engine::{InputError, ValidateInput};

/// A new prefixed, time-ordered id such as `cus_01JB...` (a ULID rendering of a UUIDv7, so ids
/// sort by creation time).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::from_bytes(Uuid::now_v7().into_bytes()))
}

/// Trims and lowercases an email, the form it is stored and compared in.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

db_enum! {
/// Where an outbox event is: held by its run until the run ends, then released (the run
/// completed; consumers read it) or discarded (it did not).
pub enum OutboxStatus in "outbox_status" {
    /// Written by a step; its run is not finished.
    Held = "held",
    /// Its run completed: consumers read it.
    Released = "released",
    /// Its run did not complete: nobody ever reads it.
    Discarded = "discarded",
}
}

impl OutboxStatus {
    /// What the held events of a run become when it ends: released if it completed.
    pub fn settled(completed: bool) -> Self {
        if completed { Self::Released } else { Self::Discarded }
    }
}

/// No email in the customer data (Medusa's message: its users match on it).
pub const EMAIL_REQUIRED: &str = "Email is required to create a customer";

/// The one rule for a customer's email, wherever it is checked (at trigger and in the
/// registration's first step): present and valid; the message to show otherwise.
pub fn check_email(email: &str) -> Result<(), String> {
    let email = email.trim();
    if email.is_empty() {
        return Err(EMAIL_REQUIRED.to_string());
    }
    if !is_valid_email(email) {
        return Err(format!("`{email}` is not a valid email address"));
    }
    Ok(())
}

/// Whether `email` is a valid address (after trimming).
pub fn is_valid_email(email: &str) -> bool {
    let email = email.trim();
    email.len() <= 254 && email_address::EmailAddress::parse_with_options(email, strict_email()).is_ok()
}

fn strict_email() -> email_address::Options {
    // Plain addresses only: no display names ("Ada <a@b.co>"), a dot in the domain.
    email_address::Options::default()
        .without_display_text()
        .with_required_tld()
}

/// A customer (Medusa's CustomerDTO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Customer {
    /// `cus_...`
    pub id: String,
    /// Trimmed and lowercased.
    pub email: String,
    /// Registered (true) or guest.
    pub has_account: bool,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Company.
    pub company_name: Option<String>,
    /// Phone.
    pub phone: Option<String>,
    /// Free-form data.
    pub metadata: Option<Value>,
    /// The customer's addresses.
    pub addresses: Vec<Address>,
    /// The default billing address.
    pub default_billing_address_id: Option<String>,
    /// The default shipping address.
    pub default_shipping_address_id: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Soft deletion time.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// A customer's address (Medusa's CustomerAddressDTO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Address {
    /// `cuaddr_...`
    pub id: String,
    /// The customer.
    pub customer_id: String,
    /// A name for the address ("Home").
    pub address_name: Option<String>,
    /// Whether it is the default shipping address.
    pub is_default_shipping: bool,
    /// Whether it is the default billing address.
    pub is_default_billing: bool,
    /// Company.
    pub company: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Street line 1.
    pub address_1: Option<String>,
    /// Street line 2.
    pub address_2: Option<String>,
    /// City.
    pub city: Option<String>,
    /// ISO 3166-1 alpha-2, lowercase.
    pub country_code: Option<String>,
    /// Province or state.
    pub province: Option<String>,
    /// Postal code.
    pub postal_code: Option<String>,
    /// Phone.
    pub phone: Option<String>,
    /// Free-form data.
    pub metadata: Option<Value>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Soft deletion time.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The customer data of a registration (Medusa's CreateCustomerDTO as the store API takes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    /// Required; a valid address.
    pub email: String,
    /// First name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Last name.
    #[serde(default)]
    pub last_name: Option<String>,
    /// Company.
    #[serde(default)]
    pub company_name: Option<String>,
    /// Phone.
    #[serde(default)]
    pub phone: Option<String>,
    /// Free-form data (an object).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Addresses to create with the customer.
    #[serde(default)]
    pub addresses: Option<Vec<NewAddress>>,
}

/// An address to create with a customer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAddress {
    /// A name for the address.
    #[serde(default)]
    pub address_name: Option<String>,
    /// Make it the default shipping address (at most one may).
    #[serde(default)]
    pub is_default_shipping: Option<bool>,
    /// Make it the default billing address (at most one may).
    #[serde(default)]
    pub is_default_billing: Option<bool>,
    /// Company.
    #[serde(default)]
    pub company: Option<String>,
    /// First name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Last name.
    #[serde(default)]
    pub last_name: Option<String>,
    /// Street line 1.
    #[serde(default)]
    pub address_1: Option<String>,
    /// Street line 2.
    #[serde(default)]
    pub address_2: Option<String>,
    /// City.
    #[serde(default)]
    pub city: Option<String>,
    /// ISO 3166-1 alpha-2 country code.
    #[serde(default)]
    pub country_code: Option<String>,
    /// Province or state.
    #[serde(default)]
    pub province: Option<String>,
    /// Postal code.
    #[serde(default)]
    pub postal_code: Option<String>,
    /// Phone.
    #[serde(default)]
    pub phone: Option<String>,
    /// Free-form data (an object).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// Longest text accepted in a name-like field.
const MAX_TEXT: usize = 1000;

fn check_text(field: &str, value: &Option<String>) -> Result<(), InputError> {
    match value {
        Some(text) if text.chars().count() > MAX_TEXT => {
            Err(InputError::new(field, format!("must be at most {MAX_TEXT} characters")))
        }
        _ => Ok(()),
    }
}

impl ValidateInput for NewCustomer {
    fn validate(&self) -> Result<(), InputError> {
        check_email(&self.email).map_err(|message| InputError::new("customerData.email", message))?;
        for (field, value) in [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("company_name", &self.company_name),
            ("phone", &self.phone),
        ] {
            check_text(&format!("customerData.{field}"), value)?;
        }
        let addresses = self.addresses.as_deref().unwrap_or_default();
        if addresses.len() > 50 {
            return Err(InputError::new("customerData.addresses", "at most 50 addresses"));
        }
        for (i, a) in addresses.iter().enumerate() {
            for (field, value) in [
                ("address_name", &a.address_name),
                ("company", &a.company),
                ("first_name", &a.first_name),
                ("last_name", &a.last_name),
                ("address_1", &a.address_1),
                ("address_2", &a.address_2),
                ("city", &a.city),
                ("province", &a.province),
                ("postal_code", &a.postal_code),
                ("phone", &a.phone),
            ] {
                check_text(&format!("customerData.addresses[{i}].{field}"), value)?;
            }
            if let Some(code) = &a.country_code
                && !(code.len() == 2 && code.chars().all(|c| c.is_ascii_alphabetic()))
            {
                return Err(InputError::new(
                    format!("customerData.addresses[{i}].country_code"),
                    "must be a two-letter ISO 3166-1 country code",
                ));
            }
        }
        let shipping = addresses.iter().filter(|a| a.is_default_shipping == Some(true)).count();
        let billing = addresses.iter().filter(|a| a.is_default_billing == Some(true)).count();
        for (defaults, what) in [(shipping, "shipping"), (billing, "billing")] {
            if defaults > 1 {
                return Err(InputError::new(
                    "customerData.addresses",
                    format!("a customer can only have one default {what} address"),
                ));
            }
        }
        Ok(())
    }
}

/// An auth identity (Medusa's AuthIdentityDTO): who logged in with which provider, and the
/// actor it is linked to in `app_metadata.customer_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuthIdentity {
    /// `authid_...`
    pub id: String,
    /// The auth provider (`emailpass`).
    pub provider: String,
    /// The provider's id for the user (an email for `emailpass`).
    pub entity_id: String,
    /// Linked actors, e.g. `{"customer_id": "cus_..."}`.
    pub app_metadata: Value,
}

/// An event in the outbox, released to consumers once its run completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct OutboxEvent {
    /// `evt_...`; pass the last one seen as `after` to read on.
    pub id: String,
    /// The event name (`customer.created`).
    pub name: String,
    /// Its payload.
    pub data: Value,
    /// The run that emitted it.
    pub run_id: Uuid,
    /// When the step wrote it.
    pub created_at: DateTime<Utc>,
    /// When its run completed and released it.
    pub released_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_sort_by_creation() {
        let a = new_id("cus");
        let b = new_id("cus");
        assert!(a.starts_with("cus_") && a.len() == 30, "{a}");
        assert!(a < b);
    }

    #[test]
    fn emails_are_checked_and_normalized() {
        for good in ["a@b.co", "  Ada.Lovelace+x@Example.COM ", "x_y@sub.example.org"] {
            assert!(is_valid_email(good), "{good}");
        }
        for bad in ["", "a", "a@", "@b.co", "a b@c.co", "a@b", "Ada <a@b.co>", "a@@b.co"] {
            assert!(!is_valid_email(bad), "{bad}");
        }
        assert_eq!(normalize_email("  Ada@Example.COM "), "ada@example.com");
    }

    fn customer(email: &str) -> NewCustomer {
        NewCustomer {
            email: email.into(),
            first_name: None,
            last_name: None,
            company_name: None,
            phone: None,
            metadata: None,
            addresses: None,
        }
    }

    #[test]
    fn new_customers_are_validated_field_by_field() {
        assert!(customer("a@b.co").validate().is_ok());
        assert_eq!(
            customer(" ").validate().map_err(|e| e.field),
            Err("customerData.email".into())
        );
        assert_eq!(
            customer("nope").validate().map_err(|e| e.field),
            Err("customerData.email".into())
        );
        let mut two_defaults = customer("a@b.co");
        let default = NewAddress {
            is_default_billing: Some(true),
            ..Default::default()
        };
        two_defaults.addresses = Some(vec![default.clone(), default]);
        assert_eq!(
            two_defaults.validate().map_err(|e| e.field),
            Err("customerData.addresses".into())
        );
        let mut bad_country = customer("a@b.co");
        bad_country.addresses = Some(vec![NewAddress {
            country_code: Some("usa".into()),
            ..Default::default()
        }]);
        assert_eq!(
            bad_country.validate().map_err(|e| e.field),
            Err("customerData.addresses[0].country_code".into())
        );
    }
}
