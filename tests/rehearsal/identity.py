"""Who sent a request, decided as AWS decides it before any policy is read.

AWS refuses a request before it evaluates a single policy when it cannot tell who sent it:
unsigned (anonymous; S3 then evaluates the bucket's policy for everyone, and the stack's bucket
grants nobody anything), signed with an access key it does not know, signed with a temporary
(ASIA…) key without the session token STS issued with it or with another token, or with a
session that has expired. Each service answers that with its own error code; the codes below are
the ones AWS's documentation and its services give (S3 error responses, the EC2 API's common
client errors, the common errors of the JSON and query protocols).

Known here: the keys of roles assumed through moto's STS (moto holds their secret and session
token), and the test harness's administrator, `testing`/`testing` (tests/integration/support.rs
`Moto::env`), whose requests are verified like any other and then run unevaluated, as an
account administrator's would be allowed.
"""

import datetime

# The test harness's own key: the account's administrator (deploys the stack, applies pipelines,
# reads what the stack made). Any other key that is not an assumed role's is refused.
ADMIN = {"testing": "testing"}

# Paths moto serves that are not AWS APIs: moto's own control API, and the instance metadata
# service (unsigned on EC2 as well).
NOT_AWS = ("/moto-api/", "/moto-api", "/latest/meta-data/", "/latest/api/")


def protocol(service, environ):
    """The error protocol a service answers in: s3, ec2, json or query."""
    if environ.get("HTTP_X_AMZ_TARGET") or service in ("scheduler", "lambda"):
        return "json"
    if service in ("s3", "ec2"):
        return service
    return "query"


INVALID_TOKEN = "The security token included in the request is invalid."
EXPIRED_TOKEN = "The security token included in the request is expired"
NO_SUCH_KEY = "The AWS Access Key Id you provided does not exist in our records."
EC2_AUTH = "AWS was not able to validate the provided access credentials"
SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)

# (why, protocol) → (HTTP status, AWS's error code, AWS's message)
ANSWERS = {
    ("unsigned", "s3"): (403, "AccessDenied", "Access Denied"),
    ("unsigned", "ec2"): (401, "MissingAuthenticationToken", "The request must contain either a valid (registered) AWS access key ID or X.509 certificate."),
    ("unsigned", "json"): (403, "MissingAuthenticationTokenException", "Missing Authentication Token"),
    ("unsigned", "query"): (403, "MissingAuthenticationToken", "Request is missing Authentication Token"),
    ("unknown key", "s3"): (403, "InvalidAccessKeyId", NO_SUCH_KEY),
    ("unknown key", "ec2"): (401, "AuthFailure", EC2_AUTH),
    ("unknown key", "json"): (400, "UnrecognizedClientException", INVALID_TOKEN),
    ("unknown key", "query"): (403, "InvalidClientTokenId", INVALID_TOKEN),
    # A temporary key is known only with its session token.
    ("no session token", "s3"): (403, "InvalidAccessKeyId", NO_SUCH_KEY),
    ("no session token", "ec2"): (401, "AuthFailure", EC2_AUTH),
    ("no session token", "json"): (400, "UnrecognizedClientException", INVALID_TOKEN),
    ("no session token", "query"): (403, "InvalidClientTokenId", INVALID_TOKEN),
    ("another session token", "s3"): (400, "InvalidToken", "The provided token is malformed or otherwise invalid."),
    ("another session token", "ec2"): (401, "AuthFailure", EC2_AUTH),
    ("another session token", "json"): (400, "UnrecognizedClientException", INVALID_TOKEN),
    ("another session token", "query"): (403, "InvalidClientTokenId", INVALID_TOKEN),
    ("expired session", "s3"): (400, "ExpiredToken", "The provided token has expired."),
    ("expired session", "ec2"): (400, "RequestExpired", "Request has expired."),
    ("expired session", "json"): (400, "ExpiredTokenException", EXPIRED_TOKEN),
    ("expired session", "query"): (403, "ExpiredToken", EXPIRED_TOKEN),
    ("signature", "s3"): (403, "SignatureDoesNotMatch", SIGNATURE),
    ("signature", "ec2"): (403, "SignatureDoesNotMatch", SIGNATURE),
    ("signature", "json"): (400, "InvalidSignatureException", SIGNATURE),
    ("signature", "query"): (403, "SignatureDoesNotMatch", SIGNATURE),
}


def answer(why, service, environ):
    return ANSWERS[(why, protocol(service, environ))]


def session_token(environ, query):
    return environ.get("HTTP_X_AMZ_SECURITY_TOKEN") or query.get("X-Amz-Security-Token")


def credential_problem(role, environ, query):
    """Why AWS would not know who signed with an assumed role's key `role` (None: not one),
    or None when the key, its session token and the session are good."""
    if role is None:
        return "unknown key"
    token = session_token(environ, query)
    if not token:
        return "no session token"
    if token != role.session_token:
        return "another session token"
    expires = role.expiration
    now = datetime.datetime.now(datetime.timezone.utc)
    if expires.tzinfo is None:
        now = now.replace(tzinfo=None)
    if expires <= now:
        return "expired session"
    return None
