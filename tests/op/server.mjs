// Test-only OpenID Provider for bff's integration and browser tests.
//
// A thin configuration of the npm package `oidc-provider` (v8): nobody here wrote the protocol
// code, so bff is tested against a real, standards-following OP. Everything is kept in memory and
// lost when the process exits. Never expose this server: any login with any password succeeds.
//
// Environment:
//   OP_PORT          port to listen on (127.0.0.1 only); issuer is http://127.0.0.1:${OP_PORT}
//   OP_ACCESS_TTL    access token / client-credentials token lifetime, seconds (default 60)
//   OP_REFRESH_TTL   refresh token, grant and OP session lifetime, seconds (default 86400)
//   OP_CLIENTS       JSON array of static client metadata (default: none; use registration)
//   OP_STATE_FILE    keep all OP state (clients, sessions, grants, tokens) in this JSON file, so a
//                    restart keeps it: with new signing keys, this is a key rotation. Default: none
//   OP_FIXED_KIDS    "1": the signing keys' kids are always "rsa-1" / "ec-1", so a restart gives
//                    new key material under known kids (default: fresh random kids)
//   OP_REVOCATION_IN where the revocation endpoint is published: "discovery" (default), "rfc8414"
//                    (only in /.well-known/oauth-authorization-server, RFC 8414) or "none"
//   OP_REVOKE_GRANT  "0": revoking a token revokes only that token, as some OPs do (RFC 7009
//                    leaves it open); default "1": oidc-provider revokes the whole grant
//   OP_DISCOVERY_PATCH JSON object merged into the discovery document, a null value removing
//                    the key: an OP that advertises less (e.g. {"end_session_endpoint": null}).
//                    Only the document changes, not what the OP does. Default: none
//   -- DPoP (RFC 9449) switches --
//   OP_DPOP          "1": features.dPoP on: the OP binds tokens to a DPoP proof's key when the
//                    token request carries one, and advertises dpop_signing_alg_values_supported
//                    (ES256, EdDSA). Default: off (the discovery document does not mention DPoP)
//   OP_DPOP_NONCE    "1" (with OP_DPOP): every DPoP proof must carry a nonce the OP issued
//                    (400/401 use_dpop_nonce with a DPoP-Nonce header otherwise). Default: off
//
// Resource indicators and token exchange (issue 12, points 1, 2 and 6):
//   OP_RESOURCE_SERVERS JSON object {"<resource URI>": {"scope": "api:read", "ttl": N}}: the
//                    resource servers (RFC 8707) the OP issues JWT access tokens for (aud = the
//                    URI, signed with the OP's keys, `ttl` seconds, default OP_ACCESS_TTL). Any
//                    other resource is invalid_target. Default: none (every resource refused)
//   OP_TOKEN_EXCHANGE "1": register the RFC 8693 token-exchange grant (advertised in
//                    grant_types_supported); a valid access token of this OP as subject_token
//                    and an `audience` or `resource` among OP_RESOURCE_SERVERS give a JWT for
//                    it; any other target is invalid_target. Default: off
//
// --- PAR and several OPs (issue 12, points 4-5) ---
//   OP_PAR           pushed authorization requests (RFC 9126): "optional" (default, as
//                    oidc-provider ships: the endpoint is advertised, PAR is not required),
//                    "required" (require_pushed_authorization_requests) or "off" (no endpoint)
//   OP_COOKIE_PREFIX prefix of the OP's own cookie names (default none), so that one browser can
//                    hold sessions at two test OPs on 127.0.0.1 (cookies ignore the port)
//   /__test/stats also counts `par_requests`: pushed authorization requests answered 201
// --- end PAR and several OPs ---
//
// Besides the OP endpoints (see /.well-known/openid-configuration) it serves:
//   GET  /interaction/:uid           login form (any login + any non-empty password) or consent
//   POST /interaction/:uid/login     fields: login, password
//   POST /interaction/:uid/confirm   grants everything requested
//   POST /interaction/:uid/abort     ends the request with error=access_denied
//   GET  /__test/stats               counters (see `stats` below)
//   POST /__test/reset               zeroes the counters
//   POST /__test/delay               {"refresh_token_ms": N, "drop_if_disconnected": bool,
//                                    "after": bool}: hold each refresh_token grant N ms before
//                                    the OP handles it (with "after": handle it at once, then hold
//                                    the answer); with drop_if_disconnected a request whose client
//                                    went away meanwhile is never handled (as if it was lost on the
//                                    way). 0 = off
//   GET  /__test/live-tokens?account=SUB   {"RefreshToken": n, "AccessToken": n}: tokens of that
//                                    account the OP would still accept (not consumed, not expired)
//   POST /__test/fail                {"refresh_token_status": S}: answer refresh_token grants with
//                                    HTTP S (e.g. 503) without handling them. 0 = off
//   (both are off at start; POST /__test/reset turns them off too)
//
// Prints READY on stdout once listening.

import { AsyncLocalStorage } from 'node:async_hooks';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';
const PORT = Number.parseInt(process.env.OP_PORT ?? '', 10);
if (!Number.isInteger(PORT) || PORT <= 0 || PORT > 65535) {
  console.error('OP_PORT must be set to a TCP port');
  process.exit(2);
}
const ISSUER = `http://${HOST}:${PORT}`;
const ACCESS_TTL = positiveInt('OP_ACCESS_TTL', 60);
const REFRESH_TTL = positiveInt('OP_REFRESH_TTL', 86400);
const CLIENTS = JSON.parse(process.env.OP_CLIENTS || '[]');
const STATE_FILE = process.env.OP_STATE_FILE || '';
const FIXED_KIDS = process.env.OP_FIXED_KIDS === '1';
const REVOCATION_IN = process.env.OP_REVOCATION_IN || 'discovery';
const REVOKE_GRANT = process.env.OP_REVOKE_GRANT !== '0';
const DISCOVERY_PATCH = JSON.parse(process.env.OP_DISCOVERY_PATCH || '{}');
// -- DPoP (RFC 9449) switches: begin --
const DPOP = process.env.OP_DPOP === '1';
const DPOP_NONCE = process.env.OP_DPOP_NONCE === '1';
// -- DPoP switches: end --
if (!['discovery', 'rfc8414', 'none'].includes(REVOCATION_IN)) {
  console.error(`OP_REVOCATION_IN must be discovery, rfc8414 or none, got ${REVOCATION_IN}`);
  process.exit(2);
}

const API_SCOPES = ['api:read', 'api:write', 'orders:read'];

// ---- resource indicators and token exchange (issue 12): settings --------------------------
const RESOURCE_SERVERS = JSON.parse(process.env.OP_RESOURCE_SERVERS || '{}');
const TOKEN_EXCHANGE = process.env.OP_TOKEN_EXCHANGE === '1';
const EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

function resourceServerInfo(identifier) {
  const known = RESOURCE_SERVERS[identifier];
  if (!known) return undefined;
  return {
    scope: known.scope ?? 'api:read',
    audience: identifier,
    accessTokenTTL: known.ttl ?? ACCESS_TTL,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}
// ---- end resource indicators and token exchange ------------------------------------------

function positiveInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number.parseInt(raw, 10);
  if (!Number.isInteger(value) || value <= 0) {
    console.error(`${name} must be a positive integer, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return value;
}

function signingKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  return [
    { ...rsa.export({ format: 'jwk' }), kid: FIXED_KIDS ? 'rsa-1' : `rsa-${crypto.randomUUID()}`, use: 'sig' },
    { ...ec.export({ format: 'jwk' }), kid: FIXED_KIDS ? 'ec-1' : `ec-${crypto.randomUUID()}`, use: 'sig' },
  ];
}

function esc(value) {
  return String(value ?? '')
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>`;
}

// ---------------------------------------------------------------------------------------------
// Counters for GET /__test/stats

function emptyStats() {
  return {
    // token endpoint requests by grant_type, successes and failures alike
    token: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
    // the failures among them, by grant_type
    token_errors: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
    revocations: 0, // revocation endpoint requests answered 200
    revocation_errors: 0,
    revoked: { RefreshToken: 0, AccessToken: 0, ClientCredentials: 0 }, // tokens actually found
    backchannel_logouts_sent: 0, // logout tokens the client acknowledged (200/204)
    backchannel_logout_errors: 0,
    end_sessions: 0, // RP-initiated logouts confirmed
    authorizations: 0, // successful authorization responses (codes issued)
  };
}

let stats = emptyStats();

// Fault injection for refresh_token grants (POST /__test/delay, /__test/fail).
function noFaults() {
  return { refreshDelayMs: 0, dropIfDisconnected: false, delayAfter: false, refreshStatus: 0 };
}

let faults = noFaults();

function bump(bucket, key) {
  bucket[key] = (bucket[key] ?? 0) + 1;
}

// ---------------------------------------------------------------------------------------------
// Storage: oidc-provider's memory adapter, but enumerable (for /__test/live-tokens), optionally
// kept in OP_STATE_FILE across restarts, and able to revoke only the presented token.

const inRevocation = new AsyncLocalStorage(); // set while the revocation endpoint runs
let storage = new Map(); // key -> { value, expiresAt (ms epoch) }

if (STATE_FILE && fs.existsSync(STATE_FILE)) {
  storage = new Map(JSON.parse(fs.readFileSync(STATE_FILE, 'utf8')));
}

function persist() {
  if (!STATE_FILE) return;
  const tmp = `${STATE_FILE}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify([...storage]));
  fs.renameSync(tmp, STATE_FILE);
}

function load(key) {
  const entry = storage.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt && entry.expiresAt <= Date.now()) {
    storage.delete(key);
    return undefined;
  }
  return entry.value;
}

function store(key, value, expiresIn) {
  storage.set(key, { value, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : 0 });
}

const GRANTABLE = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest']);

class Adapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async destroy(id) { storage.delete(this.key(id)); persist(); }

  async consume(id) {
    const value = load(this.key(id));
    if (value) value.consumed = Math.floor(Date.now() / 1000);
    persist();
  }

  async find(id) { return load(this.key(id)); }

  async findByUid(uid) { return this.find(load(`sessionUid:${uid}`)); }

  async findByUserCode(userCode) { return this.find(load(`userCode:${userCode}`)); }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (this.model === 'Session') store(`sessionUid:${payload.uid}`, id, expiresIn);
    const { grantId, userCode } = payload;
    if (GRANTABLE.has(this.model) && grantId) {
      const grantKey = `grant:${grantId}`;
      const members = load(grantKey) ?? [];
      members.push(key);
      store(grantKey, members, 0);
    }
    if (userCode) store(`userCode:${userCode}`, id, expiresIn);
    store(key, payload, expiresIn);
    persist();
  }

  async revokeByGrantId(grantId) { // eslint-disable-line class-methods-use-this
    if (!REVOKE_GRANT && inRevocation.getStore()) return; // this OP revokes only the token given
    const grantKey = `grant:${grantId}`;
    for (const key of load(grantKey) ?? []) storage.delete(key);
    storage.delete(grantKey);
    persist();
  }
}

function liveTokens(account) {
  const now = Math.floor(Date.now() / 1000);
  const counts = { RefreshToken: 0, AccessToken: 0 };
  for (const [key] of storage) {
    const [model] = key.split(':', 1);
    if (!(model in counts)) continue;
    const value = load(key);
    if (value && value.accountId === account && !value.consumed && !(value.exp && value.exp < now)) {
      counts[model] += 1;
    }
  }
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Provider

const configuration = {
  adapter: Adapter,
  clients: CLIENTS,
  jwks: { keys: signingKeys() },
  cookies: {
    keys: [crypto.randomBytes(32).toString('hex')],
    // Lax (not the default None) so plain-HTTP loopback cookies work in Chromium without the
    // `.legacy` duplicates; every hop (bff and OP on 127.0.0.1) is same-site anyway.
    long: { httpOnly: true, sameSite: 'lax' },
    short: { httpOnly: true, sameSite: 'lax' },
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', ...API_SCOPES],
  claims: {
    openid: ['sub'],
    profile: ['name'],
    email: ['email', 'email_verified'],
  },
  // profile/email claims also go into the ID token, as most OPs do, not only to userinfo.
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id, name: `Test User ${id}`, email: `${id}@example.com`, email_verified: true,
        };
      },
    };
  },
  responseTypes: ['code'],
  pkce: { methods: ['S256'], required: () => true },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  enabledJWA: {
    idTokenSigningAlgValues: ['RS256', 'ES256'],
    userinfoSigningAlgValues: ['RS256', 'ES256'],
  },
  ttl: {
    AccessToken: ACCESS_TTL,
    ClientCredentials: ACCESS_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 3600,
    RefreshToken: REFRESH_TTL,
    Grant: REFRESH_TTL,
    Session: REFRESH_TTL,
  },
  // A refresh token for every code exchange of a client allowed to refresh (the default also
  // wants offline_access, which oidc-provider drops unless prompt=consent).
  // `expiresWithSession` keeps its default: without offline_access, tokens (refresh tokens too)
  // are bound to the OP browser session and die with it, e.g. at RP-initiated logout or when
  // another user logs in in the same browser; with offline_access they outlive it.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Rotation on every use. Presenting a consumed refresh token fails with invalid_grant and
  // revokes the whole grant (oidc-provider v8 does this itself, see refresh_token.js).
  rotateRefreshToken: true,
  // Consent is implied: every requested scope and claim is granted, so a login is one form.
  async loadExistingGrant(ctx) {
    const { oidc } = ctx;
    const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
    let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
    if (!grant || grant.accountId !== oidc.account.accountId) {
      grant = new oidc.provider.Grant({
        accountId: oidc.account.accountId,
        clientId: oidc.client.clientId,
      });
    }
    grant.addOIDCScope([...oidc.requestParamScopes].join(' ') || 'openid');
    // issue 12: the scopes asked for that a requested resource server defines are granted too.
    for (const [resource, server] of Object.entries(oidc.resourceServers ?? {})) {
      const wanted = [...oidc.requestParamScopes].filter((s) => server.scopes.has(s));
      if (wanted.length) grant.addResourceScope(resource, wanted.join(' '));
    }
    if (oidc.requestParamClaims.size) grant.addOIDCClaims([...oidc.requestParamClaims]);
    await grant.save();
    return grant;
  },
  interactions: {
    url: async (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false }, // replaced by the plain forms below
    registration: { enabled: true }, // open RFC 7591 registration, no initial access token
    revocation: { enabled: true },
    introspection: { enabled: true },
    clientCredentials: { enabled: true },
    // issue 12: resource indicators for OP_RESOURCE_SERVERS (the code exchange without a
    // resource still gets the opaque userinfo token: useGrantedResource stays false).
    resourceIndicators: {
      enabled: true,
      async getResourceServerInfo(ctx, identifier) {
        const info = resourceServerInfo(identifier);
        if (!info) throw new errors.InvalidTarget();
        return info;
      },
    },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        // `form` is <form id="op.logoutForm" ...><input type="hidden" name="xsrf" .../></form>;
        // the buttons go inside it so any form parser finds them.
        const buttons = '<button type="submit" id="logout-yes" name="logout" value="yes">Yes, sign me out</button>\n'
          + '<button type="submit" id="logout-no">No, stay signed in</button>\n</form>';
        ctx.type = 'html';
        ctx.body = page('Sign out', `<p>Do you want to sign out from ${esc(ctx.host)}?</p>\n${form.replace('</form>', buttons)}`);
      },
      async postLogoutSuccessSource(ctx) {
        ctx.type = 'html';
        ctx.body = page('Signed out', '<p id="signed-out">You are signed out.</p>');
      },
    },
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<pre id="error">${esc(out.error)}</pre>\n<pre id="error_description">${esc(out.error_description)}</pre>`);
  },
};

// -- DPoP (RFC 9449): begin --
if (DPOP) {
  configuration.features.dPoP = {
    enabled: true,
    nonceSecret: crypto.randomBytes(32),
    requireNonce: () => DPOP_NONCE,
  };
}
// -- DPoP: end --
// --- PAR and several OPs (issue 12, points 4-5): configuration ---
const PAR = process.env.OP_PAR || 'optional';
if (!['optional', 'required', 'off'].includes(PAR)) {
  console.error(`OP_PAR must be optional, required or off, got ${PAR}`);
  process.exit(2);
}
configuration.features.pushedAuthorizationRequests = {
  enabled: PAR !== 'off',
  requirePushedAuthorizationRequests: PAR === 'required',
};
const COOKIE_PREFIX = process.env.OP_COOKIE_PREFIX || '';
if (COOKIE_PREFIX) {
  configuration.cookies.names = {
    session: `${COOKIE_PREFIX}_session`,
    interaction: `${COOKIE_PREFIX}_interaction`,
    resume: `${COOKIE_PREFIX}_interaction_resume`,
    state: `${COOKIE_PREFIX}_state`,
  };
}
// --- end PAR and several OPs: configuration ---

const provider = new Provider(ISSUER, configuration);

// --- PAR and several OPs (issue 12, points 4-5): count pushed authorization requests ---
provider.use(async (ctx, next) => {
  await next();
  if (ctx.method === 'POST' && ctx.path === '/request' && ctx.status === 201) {
    stats.par_requests = (stats.par_requests ?? 0) + 1;
  }
});
// --- end PAR and several OPs: counting ---

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('backchannel.success', () => { stats.backchannel_logouts_sent += 1; });
provider.on('backchannel.error', (ctx, err, client) => {
  stats.backchannel_logout_errors += 1;
  console.error(`backchannel logout to ${client.backchannelLogoutUri} failed: ${err.message}`);
});
provider.on('end_session.success', () => { stats.end_sessions += 1; });
provider.on('authorization.success', () => { stats.authorizations += 1; });

const ROUTES = { token: '/token', revocation: '/token/revocation' };

// ---- token exchange (issue 12, OP_TOKEN_EXCHANGE) ------------------------------------------
async function tokenExchange(ctx, next) {
  const { params, client, provider: op } = ctx.oidc;
  if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
    throw new errors.InvalidRequest('subject_token_type must be an access token');
  }
  const subject = await op.AccessToken.find(String(params.subject_token ?? ''));
  if (!subject || subject.isExpired) throw new errors.InvalidGrant('subject token invalid');
  const targets = [params.audience, params.resource].flat().filter(Boolean);
  if (targets.length !== 1) throw new errors.InvalidTarget('exactly one audience or resource');
  const info = resourceServerInfo(targets[0]);
  if (!info) throw new errors.InvalidTarget('unknown audience');
  const allowed = new Set(info.scope.split(' '));
  const asked = String(params.scope ?? '').split(' ').filter(Boolean);
  const at = new op.AccessToken({
    accountId: subject.accountId,
    client,
    grantId: subject.grantId,
    gty: EXCHANGE_GRANT,
    scope: asked.filter((s) => allowed.has(s)).join(' ') || undefined,
  });
  at.resourceServer = new op.ResourceServer(targets[0], info);
  ctx.oidc.entity('AccessToken', at);
  const value = await at.save();
  ctx.body = {
    access_token: value,
    issued_token_type: ACCESS_TOKEN_TYPE,
    token_type: 'Bearer',
    expires_in: at.expiration,
    scope: at.scope,
  };
  await next();
}

if (TOKEN_EXCHANGE) {
  provider.registerGrantType(EXCHANGE_GRANT, tokenExchange, [
    'subject_token', 'subject_token_type', 'audience', 'resource', 'scope',
    'requested_token_type', 'actor_token', 'actor_token_type',
  ], ['audience', 'resource']);
}
// ---- end token exchange -----------------------------------------------------------------

// OP_REVOCATION_IN=rfc8414|none: discovery does not name the revocation endpoint.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/.well-known/openid-configuration' && REVOCATION_IN !== 'discovery'
      && ctx.body && typeof ctx.body === 'object') {
    delete ctx.body.revocation_endpoint;
  }
});

// OP_DISCOVERY_PATCH: advertise less (or other values) than the OP offers.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/.well-known/openid-configuration' && ctx.body && typeof ctx.body === 'object') {
    for (const [key, value] of Object.entries(DISCOVERY_PATCH)) {
      if (value === null) delete ctx.body[key];
      else ctx.body[key] = value;
    }
  }
});

// Count token and revocation requests by outcome, after the provider has answered them.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.method !== 'POST') return;
  if (ctx.path === ROUTES.token) {
    const grantType = ctx.oidc?.params?.grant_type ?? ctx.oidc?.body?.grant_type ?? 'unknown';
    bump(stats.token, grantType);
    if (ctx.status !== 200) bump(stats.token_errors, grantType);
  } else if (ctx.path === ROUTES.revocation) {
    if (ctx.status === 200) {
      stats.revocations += 1;
      for (const kind of Object.keys(stats.revoked)) {
        if (ctx.oidc?.entities?.[kind]) bump(stats.revoked, kind);
      }
    } else {
      stats.revocation_errors += 1;
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Login / consent interactions: plain HTML forms a browser and an HTTP client can both submit.

function loginPage(uid, details, message) {
  const { params } = details;
  return page('Sign in', `${message ? `<p id="message">${esc(message)}</p>\n` : ''}<p>to ${esc(params.client_id)}</p>
<form id="login-form" method="post" action="/interaction/${esc(uid)}/login">
  <label>Login <input id="login" type="text" name="login" required autofocus value="${esc(params.login_hint)}"></label>
  <label>Password <input id="password" type="password" name="password" required></label>
  <button id="sign-in" type="submit">Sign in</button>
</form>
<form id="abort-form" method="post" action="/interaction/${esc(uid)}/abort">
  <button id="cancel" type="submit">Cancel</button>
</form>`);
}

function consentPage(uid, details) {
  const scopes = details.params.scope ?? '';
  return page('Authorize', `<p>${esc(details.params.client_id)} asks for: <code id="scopes">${esc(scopes)}</code></p>
<form id="consent-form" method="post" action="/interaction/${esc(uid)}/confirm">
  <button id="allow" type="submit">Allow</button>
</form>
<form id="abort-form" method="post" action="/interaction/${esc(uid)}/abort">
  <button id="cancel" type="submit">Cancel</button>
</form>`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function readRaw(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

async function readJson(req) {
  const raw = (await readRaw(req)).toString('utf8');
  return raw ? JSON.parse(raw) : {};
}

// Applies `faults` to a token request. Returns false when the request was answered (or dropped)
// here; otherwise the provider handles it, reading the already consumed body from `req.body`
// (oidc-provider's documented fallback for a body parsed upstream).
async function tokenFaults(req, res) {
  const raw = await readRaw(req);
  req.body = raw;
  if (new URLSearchParams(raw.toString('utf8')).get('grant_type') !== 'refresh_token') return true;
  if (faults.refreshStatus) {
    bump(stats.token, 'refresh_token');
    bump(stats.token_errors, 'refresh_token');
    send(res, faults.refreshStatus, 'application/json', JSON.stringify({
      error: 'temporarily_unavailable', error_description: 'injected by /__test/fail',
    }));
    return false;
  }
  if (faults.refreshDelayMs && faults.delayAfter) {
    // Handle it now; hold the answer (headers and body go out with res.end).
    const ms = faults.refreshDelayMs;
    const end = res.end.bind(res);
    res.end = (...args) => { setTimeout(() => end(...args), ms); return res; };
    return true;
  }
  if (faults.refreshDelayMs) {
    const drop = faults.dropIfDisconnected; // as set when this request arrived
    let gone = false;
    res.on('close', () => { gone = !res.writableFinished; });
    await new Promise((resolve) => { setTimeout(resolve, faults.refreshDelayMs); });
    if (gone && drop) {
      console.log('refresh_token grant dropped: its client went away during the delay');
      return false;
    }
  }
  return true;
}

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

async function interaction(req, res, uid, action) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    if (err instanceof errors.SessionNotFound) {
      send(res, 400, 'text/html; charset=utf-8', page('Error', '<p id="error">interaction session not found (cookies?)</p>'));
      return;
    }
    throw err;
  }
  if (details.uid !== uid) {
    send(res, 400, 'text/html; charset=utf-8', page('Error', '<p id="error">interaction mismatch</p>'));
    return;
  }
  const { prompt } = details;

  if (req.method === 'GET' && action === '') {
    const html = prompt.name === 'login' ? loginPage(uid, details) : consentPage(uid, details);
    send(res, 200, 'text/html; charset=utf-8', html);
    return;
  }
  if (req.method !== 'POST') {
    send(res, 405, 'text/plain', 'method not allowed');
    return;
  }

  if (action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const login = (form.get('login') ?? '').trim();
    if (!login || !form.get('password')) {
      send(res, 400, 'text/html; charset=utf-8', loginPage(uid, details, 'login and password are required'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: login } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }

  if (action === 'confirm' && prompt.name === 'consent') {
    const { grantId, session, params } = details;
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    const consent = { grantId: await grant.save() };
    await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
    return;
  }

  send(res, 400, 'text/html; charset=utf-8', page('Error', `<p id="error">unexpected ${esc(action)} for prompt ${esc(prompt.name)}</p>`));
}

// ---------------------------------------------------------------------------------------------
// HTTP server

const providerHandler = provider.callback();

async function handle(req, res) {
  const { pathname } = new URL(req.url, ISSUER);

  if (pathname === '/__test/stats' && req.method === 'GET') {
    send(res, 200, 'application/json', JSON.stringify(stats));
    return;
  }
  if (pathname === '/__test/reset' && req.method === 'POST') {
    stats = emptyStats();
    faults = noFaults();
    send(res, 200, 'application/json', JSON.stringify(stats));
    return;
  }
  if (pathname === '/__test/live-tokens' && req.method === 'GET') {
    const account = new URL(req.url, ISSUER).searchParams.get('account') ?? '';
    send(res, 200, 'application/json', JSON.stringify(liveTokens(account)));
    return;
  }
  if (pathname === '/.well-known/oauth-authorization-server' && req.method === 'GET') {
    if (REVOCATION_IN !== 'rfc8414') {
      send(res, 404, 'application/json', JSON.stringify({ error: 'not_found' }));
      return;
    }
    send(res, 200, 'application/json', JSON.stringify({
      issuer: ISSUER,
      authorization_endpoint: `${ISSUER}/auth`,
      token_endpoint: `${ISSUER}${ROUTES.token}`,
      jwks_uri: `${ISSUER}/jwks`,
      revocation_endpoint: `${ISSUER}${ROUTES.revocation}`,
      response_types_supported: ['code'],
    }));
    return;
  }
  if (pathname === '/__test/delay' && req.method === 'POST') {
    const body = await readJson(req);
    faults.refreshDelayMs = Math.max(0, Number(body.refresh_token_ms) || 0);
    faults.dropIfDisconnected = body.drop_if_disconnected === true;
    faults.delayAfter = body.after === true;
    send(res, 200, 'application/json', JSON.stringify(faults));
    return;
  }
  if (pathname === '/__test/fail' && req.method === 'POST') {
    const body = await readJson(req);
    faults.refreshStatus = Math.max(0, Number(body.refresh_token_status) || 0);
    send(res, 200, 'application/json', JSON.stringify(faults));
    return;
  }
  if (pathname === ROUTES.token && req.method === 'POST'
      && (faults.refreshDelayMs || faults.refreshStatus)) {
    if (!(await tokenFaults(req, res))) return;
  }

  const match = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/.exec(pathname);
  if (match) {
    await interaction(req, res, match[1], match[2] ?? '');
    return;
  }

  if (pathname === ROUTES.revocation) {
    inRevocation.run(true, () => providerHandler(req, res));
    return;
  }
  providerHandler(req, res);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error('interaction error', err);
    if (!res.headersSent) send(res, 500, 'text/plain', 'internal error');
    else res.end();
  });
});

server.listen(PORT, HOST, () => {
  process.stdout.write('READY\n');
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
