// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'invitations',
  title: 'Invitations',
  group: 'Account',
  render(ctx, el) {
    mount(el, header('Invitations'), h('p', {}, 'Not built yet.'));
  },
};
