// Sign-in and sign-up: the account API; the answer's session token is kept for this tab only.

import { h, field, errorBox, mount } from '../lib/dom.js';
import { post, setSession } from '../lib/api.js';

function authForm({ title, submit, fields, footer, onDone, send }) {
  const error = h('div', { class: 'form-error' });
  const button = h('button', { type: 'submit', class: 'primary wide' }, submit);
  const form = h('form', {
    class: 'auth-form', 'aria-label': title,
    onsubmit: async (e) => {
      e.preventDefault();
      button.disabled = true;
      mount(error);
      try {
        const answer = await send(Object.fromEntries(new FormData(form)));
        setSession(answer);
        await onDone();
      } catch (err) {
        mount(error, errorBox(err));
      } finally {
        button.disabled = false;
      }
    },
  }, h('h1', {}, title), fields, error, button, footer);
  return h('main', { class: 'center auth' },
    h('div', { class: 'brand big' }, h('img', { src: '/assets/logo.svg', alt: '' }), 'Fluxbase'),
    form);
}

export function loginView(onDone) {
  return authForm({
    title: 'Sign in',
    submit: 'Sign in',
    fields: [
      field('Email', h('input', { name: 'email', type: 'email', required: true, autocomplete: 'username' })),
      field('Password', h('input', { name: 'password', type: 'password', required: true, autocomplete: 'current-password' })),
    ],
    footer: h('p', { class: 'muted' }, 'No account yet? ', h('a', { href: '/signup' }, 'Sign up')),
    send: (f) => post('/api/auth/login', { email: f.email, password: f.password }),
    onDone,
  });
}

export function signupView(onDone) {
  return authForm({
    title: 'Create your account',
    submit: 'Sign up',
    fields: [
      field('Name', h('input', { name: 'displayName', type: 'text', maxLength: 200, autocomplete: 'name' })),
      field('Email', h('input', { name: 'email', type: 'email', required: true, autocomplete: 'username' })),
      field('Password', h('input', { name: 'password', type: 'password', required: true, minLength: 8, maxLength: 1024, autocomplete: 'new-password' }), '8 characters or more.'),
    ],
    footer: h('p', { class: 'muted' }, 'Already have an account? ', h('a', { href: '/login' }, 'Sign in')),
    send: (f) => post('/api/auth/signup', { email: f.email, password: f.password, ...(f.displayName ? { displayName: f.displayName } : {}) }),
    onDone,
  });
}
