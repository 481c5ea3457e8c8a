// The demo SPA: everything an app needs to work behind bff, and nothing more.
//
//  * Who am I?      GET /bff/user with the X-CSRF header -> claims, or 401 when not logged in.
//  * Log in:        navigate (a plain link) to /bff/login?returnTo=<where to come back>.
//  * Call an API:   fetch('/api/...', {headers: {'X-CSRF': '1'}}). No token in sight: bff keeps
//                   it server-side, attaches it, and refreshes it when it expires.
//  * 401 anywhere:  the session is gone (expired, logged out elsewhere): show the login button.
//  * Log out:       navigate to the logout_url that /bff/user returned.
//  * Failed login:  bff sends the browser back here with ?bff_error=<code> (the person cancelled,
//                   the provider refused, too many attempts...): say so, and drop the parameter
//                   so that a reload or the next login does not show it again.
//
// The X-CSRF header is what makes these calls safe: a custom header forces a CORS preflight,
// which no other site passes, so another site cannot make the browser call bff for you.

import {
  show, showClaims, showApiPending, showApiAnswer, showApiError, showLoginError, startCountdown,
} from './view.js';

const CSRF = { 'X-CSRF': '1' };

/** Why the last login failed, from bff's ?bff_error=<code>, taken out of the address bar. */
function takeLoginError() {
  const url = new URL(location.href);
  const code = url.searchParams.get('bff_error');
  if (code === null) return null;
  url.searchParams.delete('bff_error');
  history.replaceState(history.state, '', url.pathname + url.search + url.hash);
  return code;
}

/** The login link for coming back to the page we are on now. */
function loginUrl() {
  const here = location.pathname === '/signed-out' ? '/' : location.pathname + location.search;
  return `/bff/login?returnTo=${encodeURIComponent(here)}`;
}

/** Not logged in (or no longer): offer the login button, and say why. */
function loggedOut(message) {
  document.getElementById('login').href = loginUrl();
  show('logged-out', message);
}

/** Ask bff who is logged in. 401 is a normal answer: nobody. */
async function loadUser() {
  let response;
  try {
    response = await fetch('/bff/user', { headers: CSRF });
  } catch {
    show('logged-out', 'bff is not reachable. Is it running?');
    return;
  }
  const body = await response.json().catch(() => null); // always read the body: frees the connection
  if (response.status === 401) {
    const signedOut = location.pathname === '/signed-out';
    loggedOut(signedOut ? 'You are signed out.' : 'Log in to see who you are and call the API.');
    return;
  }
  if (!response.ok) {
    loggedOut(`bff answered ${response.status}. Try again in a moment.`);
    return;
  }
  document.getElementById('logout').href = body.logout_url;
  showClaims(body);
  startCountdown(body, loadUser);
  show('logged-in');
}

let calls = 0;

/** Call the demo API through bff's proxy, exactly as an app would. */
async function callApi() {
  const button = document.getElementById('call-api');
  button.disabled = true;
  const call = ++calls;
  showApiPending(call);
  try {
    const response = await fetch('/api/demo/hello', { headers: CSRF });
    const body = await response.json().catch(() => null);
    if (response.status === 401) {
      // No live session. An app could also go straight to the login page:
      //   location.assign(loginUrl());
      showApiError(call, 401, 'Not logged in: the API call needs a session.');
      loggedOut('Your session has ended. Log in again to call the API.');
      return;
    }
    if (!response.ok) {
      showApiError(call, response.status, body?.error_description ?? body?.error ?? 'request failed');
      return;
    }
    showApiAnswer(call, response.status, body);
    loadUser(); // the session's idle deadline moved: show it
  } catch (err) {
    showApiError(call, 0, `network error: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

document.getElementById('call-api').addEventListener('click', callApi);

// Back/forward can restore this page from the browser's memory (bfcache) as it was, logged in
// or not: ask bff again instead of trusting what the page remembers.
window.addEventListener('pageshow', (event) => {
  if (event.persisted) loadUser();
});

showLoginError(takeLoginError());
loadUser();
