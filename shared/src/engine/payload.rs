//! Payload templates (Parameters, ItemSelector, ResultSelector): keys ending in `.$` take their
//! value from a path or an intrinsic function; everything else is copied.

use serde_json::{Map, Value as Json};

use super::error::StateError;
use super::{intrinsic, path};

/// Applies `template` to `input`, reading `$$` from `context`.
pub fn apply(template: &Json, input: &Json, context: &Json) -> Result<Json, StateError> {
    match template {
        Json::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                match k.strip_suffix(".$") {
                    Some(name) => {
                        let expr = v.as_str().ok_or_else(|| {
                            StateError::new(
                                "States.Runtime",
                                format!(
                                    "the value of `{k}` must be a path or an intrinsic function"
                                ),
                            )
                        })?;
                        let value = if intrinsic::is_call(expr) {
                            // AWS (and moto, whose interpreter is checked against AWS recordings)
                            // fail the execution with States.Runtime, not States.IntrinsicFailure,
                            // when an intrinsic function cannot be evaluated.
                            intrinsic::evaluate(expr, input, context)
                                .map_err(|e| StateError::new("States.Runtime", e))?
                        } else {
                            let p = path::parse(expr)
                                .map_err(|e| StateError::new("States.Runtime", e))?;
                            path::select(&p, input, context).map_err(|e| StateError::new("States.Runtime", format!("The JSONPath '{expr}' specified for the field '{k}' could not be found in the input: {e}")))?
                        };
                        out.insert(name.to_string(), value);
                    }
                    None => {
                        out.insert(k.clone(), apply(v, input, context)?);
                    }
                }
            }
            Ok(Json::Object(out))
        }
        Json::Array(items) => Ok(Json::Array(
            items
                .iter()
                .map(|i| apply(i, input, context))
                .collect::<Result<_, _>>()?,
        )),
        other => Ok(other.clone()),
    }
}
