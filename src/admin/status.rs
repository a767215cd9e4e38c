//! The one mapping from keygate errors to gRPC statuses: each rule refusal has its code (an
//! invalid argument carries its field violations as a `BadRequest` detail); anything else is
//! logged with its cause and answered `INTERNAL` without it. Depends on `domain` and `store`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::RuleError;
use crate::store::StoreError;

impl From<RuleError> for Status {
    fn from(rule: RuleError) -> Status {
        let message = rule.to_string();
        match rule {
            RuleError::Invalid(violations) => {
                let v: Vec<tonic_types::FieldViolation> = violations
                    .into_iter()
                    .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                    .collect();
                Status::with_error_details(
                    Code::InvalidArgument,
                    message,
                    ErrorDetails::with_bad_request(v),
                )
            }
            RuleError::AlreadyExists { .. } | RuleError::AlreadyInUse(_) => {
                Status::already_exists(message)
            }
            RuleError::NotFound { .. } => Status::not_found(message),
            RuleError::FailedPrecondition(_) => Status::failed_precondition(message),
            RuleError::ResourceExhausted(_) => Status::resource_exhausted(message),
            RuleError::Unimplemented(_) => Status::unimplemented(message),
        }
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        match err {
            StoreError::Rule(rule) => rule.into(),
            other => {
                tracing::error!(error = %other, "admin request failed");
                Status::internal("internal error; see the keygate log")
            }
        }
    }
}
